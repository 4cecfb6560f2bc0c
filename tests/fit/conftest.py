"""Shared by the block-by-block fit tests (test_fit_blocks.py, test_fit_sequential.py), handed out as fixtures:
a tiny Llama's config, every module input held for the test, and a log of what each layer's fit is given."""

import pytest
import torch
from transformers import LlamaConfig

import rpq_fx.fit


@pytest.fixture
def tiny_llama():
    """The config of a 3-block Llama small enough to fit whole in a second."""
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def held_inputs():
    """Every module's inputs kept alive until the test ends."""
    # reason: call_groups groups consecutive layers by their input's data_ptr; a freed input's memory can come back
    # as the next layer's input and join two groups at random (reported): holding every input avoids it
    inputs = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: inputs.append(args))
    yield
    hook.remove()


def _statistics(stats) -> tuple | None:
    return None if stats is None else tuple(None if t is None else t.clone()
                                            for t in (stats.hessian, stats.cross, stats.row_counts))


class FitLog:
    """What each layer's fit was given: :meth:`record` (in place of ``fit_layer``) fits and keeps the statistics,
    seed and fitted state by plan name; :meth:`replay`, on a second run, keeps what it is given and puts back the
    recorded fit, so that the layers after it get the same inputs (a k-means code can flip on a last-bit
    difference of a hidden state)."""

    def __init__(self):
        self.seen, self.fitted, self.got = {}, {}, {}
        self._fit = rpq_fx.fit.fit_layer

    def record(self, plan, weight, stats, seed):
        self.seen[plan.name] = (_statistics(stats), seed)
        outcome = self._fit(plan, weight, stats, seed)
        self.fitted[plan.name] = ({k: v.clone() for k, v in weight.state_dict().items()}, outcome)
        return outcome

    def replay(self, plan, weight, stats, seed):
        self.got[plan.name] = (_statistics(stats), seed)
        state, outcome = self.fitted[plan.name]
        weight.load_state_dict(state)
        return outcome

    def assert_same(self, *, rtol: float, atol: float) -> None:
        """Every layer got the recorded seed and statistics (Gram matrix, cross-covariance, lookup counts), to
        ``rtol`` and ``atol`` times the largest recorded value."""
        assert self.got.keys() == self.seen.keys()
        for name, (want, want_seed) in self.seen.items():
            stats, seed = self.got[name]
            assert seed == want_seed, name
            assert (stats is None) == (want is None), name
            for value, reference in zip(stats or (), want or ()):
                assert (value is None) == (reference is None), name
                if value is not None:
                    torch.testing.assert_close(value, reference, rtol=rtol, atol=atol * reference.abs().max().item(),
                                               msg=lambda text: f"{name}: {text}")

    def kinds(self) -> dict[str, tuple[bool, bool, bool]]:
        """Which statistics each calibrated layer's fit got: (Gram matrix, cross-covariance, lookup counts)."""
        return {name: tuple(t is not None for t in stats) for name, (stats, _) in self.seen.items()
                if stats is not None}


@pytest.fixture
def fit_log():
    return FitLog()
