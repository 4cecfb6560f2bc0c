"""Shared helpers for the pass and API tests: the dense reference check and small hand-written models.

The reference is independent of the converted model: a deep copy of the *original* dense model with
``rpq_fx.decompress(converted)`` loaded into it. The converted model must compute what that dense
model computes.
"""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rpq_fx
import rpq_fx.ops as ops
from rpq_fx import _kernels

if os.environ.get("PYTEST_XDIST_WORKER"):
    # reason: two xdist workers with two OpenMP threads each on two cores spin against each other;
    # the k-means fits (many small ops) ran up to 100x slower that way
    torch.set_num_threads(1)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    raise TypeError(f"unexpected output type {type(out).__name__}")


def converted_names(converted: nn.Module) -> set[str]:
    """Every original parameter name (each alias of a tied weight) that the conversion turned into RPQ."""
    return {alias for layer in converted.rpq_layers if layer.converted for alias in layer.aliases}


def dense_reference(original: nn.Module, converted: nn.Module, *, leftovers: bool = False) -> nn.Module:
    """A deep copy of ``original`` with ``decompress(converted)`` loaded into it.

    ``leftovers=True`` also loads the converted model's own dense tensors (biases, norms, buffers)
    under the names the original has, for a converted model that was trained after conversion.
    """
    reference = copy.deepcopy(original)
    dense = rpq_fx.decompress(converted)
    assert dense, "the converted model holds no RPQ weight: comparing dense with dense proves nothing"
    expected = converted_names(converted) if hasattr(converted, "rpq_layers") else set(dense)
    assert set(dense) == expected, f"decompress names {sorted(dense)} != converted weights {sorted(expected)}"
    state = dict(dense)
    if leftovers:
        own = reference.state_dict()
        state.update({k: v for k, v in converted.state_dict().items() if k in own and k not in dense})
    result = reference.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, f"decompressed names the original does not have: {result.unexpected_keys}"
    loaded = set(dense) - set(result.missing_keys)
    assert loaded == set(dense), f"not loaded: {sorted(set(dense) - loaded)}"
    for name, value in dense.items():
        target = reference.get_parameter(name)
        assert target.shape == value.shape, f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}"
        assert torch.equal(target.detach(), value), f"{name} was not loaded into the reference"
    return reference


def assert_outputs_close(actual, expected, *, rtol: float = 1e-4, atol_rel: float = 1e-5) -> None:
    """Outputs equal to float32 tolerance, the absolute part scaled by the reference's magnitude."""
    actual, expected = _tensors(actual), _tensors(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, f"shape {tuple(a.shape)} != reference {tuple(e.shape)}"
        if not e.is_floating_point():
            assert torch.equal(a, e)
            continue
        scale = e.detach().abs().max().item()
        assert scale > 1e-4, f"reference output is ~0 (max |y| = {scale:g}): the comparison would mean nothing"
        assert e.detach().std().item() > 1e-6 * scale or e.numel() == 1, "reference output is constant"
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol_rel * scale)


def assert_matches_dense_reference(original: nn.Module, converted: nn.Module, *inputs, leftovers: bool = False,
                                   rtol: float = 1e-4, atol_rel: float = 1e-5) -> nn.Module:
    """``converted(*inputs)`` equals the dense reference built from ``original``; returns the reference."""
    reference = dense_reference(original, converted, leftovers=leftovers)
    with torch.no_grad():
        expected = reference(*inputs)
        actual = converted(*inputs)
    assert_outputs_close(actual, expected, rtol=rtol, atol_rel=atol_rel)
    return reference


def snapshot(model: nn.Module) -> dict:
    """Everything about ``model`` that conversion must not touch (inplace=False)."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)],
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "the model's module tree changed"
    assert after["params"] == before["params"], "the model's parameters were replaced or removed"
    assert after["ids"] == before["ids"], "the model's state tensors were replaced"
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert after["training"] == before["training"]


# ---------------------------------------------------------------------------------------------------
# Hand-written models


class LeNet(nn.Module):
    """The LeNet of the original RPQ README."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class SharedModule(nn.Module):
    """One Linear called twice (and one that stays dense: 64 rows is too few to shrink)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 512)
        self.proj = nn.Linear(512, 64)

    def forward(self, x):
        return self.fc(torch.tanh(self.proj(self.fc(x))))


class TiedLM(nn.Module):
    """Embedding and lm_head sharing one Parameter."""

    def __init__(self, vocab: int = 1000, dim: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, tokens):
        return self.lm_head(self.norm(self.emb(tokens)))


class Functional(nn.Module):
    """Weights used through functional calls on the model's own Parameters."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 64) / 8)
        self.b = nn.Parameter(torch.randn(512) / 8)
        self.k = nn.Parameter(torch.randn(512, 4, 3, 3) / 6)
        self.table = nn.Parameter(torch.randn(1000, 64))

    def forward(self, x, img, tokens):
        y = F.linear(x, self.w, self.b)
        z = F.conv2d(img, self.k, None, 1, 1)
        e = F.embedding(tokens, self.table)
        return y, z, e


class ConvVariants(nn.Module):
    """Convolutions with reflect padding, groups, dilation, stride, padding='same', and a Conv1d/3d."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(16, 512, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(512, 512, 3, stride=2, padding=2, dilation=2, groups=4)
        self.same = nn.Conv2d(512, 512, 3, padding="same", bias=False)
        self.circular1d = nn.Conv1d(8, 512, 4, padding="same", padding_mode="circular", dilation=2)
        self.conv3d = nn.Conv3d(4, 512, 2, stride=(1, 2, 2), padding=(1, 0, 1))

    def forward(self, img, seq, vol):
        return self.same(F.relu(self.grouped(self.reflect(img)))), self.circular1d(seq), self.conv3d(vol)


def conv_inputs():
    return torch.randn(2, 16, 12, 12), torch.randn(2, 8, 20), torch.randn(2, 4, 5, 6, 6)


def functional_inputs():
    return torch.randn(3, 64), torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2, 7))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------------
# Fixtures (helpers are handed out as fixtures so that no test imports ``conftest`` by name)


@pytest.fixture
def check():
    """The reference helpers: ``check.matches_dense_reference(original, converted, *inputs)`` and friends."""
    return SimpleNamespace(
        matches_dense_reference=assert_matches_dense_reference,
        dense_reference=dense_reference,
        outputs_close=assert_outputs_close,
        converted_names=converted_names,
        snapshot=snapshot,
        unchanged=assert_unchanged,
    )


@pytest.fixture
def zoo():
    """The hand-written model classes and example inputs."""
    return SimpleNamespace(
        LeNet=LeNet, SharedModule=SharedModule, TiedLM=TiedLM, Functional=Functional, ConvVariants=ConvVariants,
        conv_inputs=conv_inputs, functional_inputs=functional_inputs,
    )


# ---------------------------------------------------------------------------------------------------
# Op references: codes, expansions and codebook gradients computed without rpq_fx.ops


def store_codes(ucodes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Unsigned int64 codes -> the stored dtype: uint8 up to 256 codes, else int16 bit patterns."""
    assert int(ucodes.min()) >= 0 and int(ucodes.max()) < num_codes
    if num_codes <= 256:
        return ucodes.to(torch.uint8)
    # two's complement by hand, independent of any cast the library might use
    return torch.where(ucodes >= 32768, ucodes - 65536, ucodes).to(torch.int16)


def unsigned_codes(codes: torch.Tensor) -> torch.Tensor:
    """Stored (or already unsigned) codes as int64 row numbers, int16 bit patterns read as unsigned."""
    return codes.to(torch.int64) & 0xFFFF if codes.dtype == torch.int16 else codes.to(torch.int64)


def reference_expand(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]``, one codebook at a time."""
    u = unsigned_codes(codes)
    groups = codebooks.shape[0]
    return torch.cat([codebooks[0 if groups == 1 else c, u[c]] for c in range(u.shape[0])], dim=1)


def codebook_gradient(dense_grad: torch.Tensor, codes: torch.Tensor, num_groups: int, num_codes: int) -> torch.Tensor:
    """The codebooks' gradient ``[G, K, d]`` from the dense weight's ``[N, C*d]``: each slice's rows summed
    into the codeword its code names (over all slices when one codebook is shared)."""
    u = unsigned_codes(codes)
    num_codebooks, num_vectors = u.shape
    rows = dense_grad.reshape(num_vectors, num_codebooks, -1)
    out = dense_grad.new_zeros(num_codebooks, num_codes, rows.shape[-1])
    for c in range(num_codebooks):
        out[c].index_add_(0, u[c], rows[:, c])
    return out.sum(0, keepdim=True) if num_groups == 1 else out


def make_case(C, K, d, N, shared, dtype, seed, device="cpu"):
    """``(codebooks, unsigned int64 codes, stored codes)`` of a random layer."""
    gen = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(1 if shared else C, K, d, generator=gen, dtype=dtype)
    ucodes = torch.randint(0, K, (C, N), generator=gen)
    return codebooks.to(device), ucodes.to(device), store_codes(ucodes, K).to(device)


@pytest.fixture(scope="session")
def ref():
    """The op references: ``ref.expand(codebooks, codes)``, ``ref.make_case(...)`` and friends."""
    return SimpleNamespace(store_codes=store_codes, unsigned=unsigned_codes, expand=reference_expand,
                           codebook_gradient=codebook_gradient, make_case=make_case)


BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not _kernels.available(), reason=f"C++ kernels not built: {_kernels.build_error()}"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each op test once on stock torch ops and once on the C++ kernels (where built)."""
    if request.param == "cpp":
        yield request.param
        return
    with ops.stock_ops():
        yield request.param


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest non-meta tensor any op seen from Python returns (a custom
    op's insides are not seen)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out
