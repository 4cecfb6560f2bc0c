"""A committed ``format_version: 1`` checkpoint still loads and computes what it computed when saved.

``tests/fixtures/format1_net.safetensors`` was written by ``python tests/test_io_format1.py`` with
rpq_fx 0.1.0 / torch 2.14 (commit 1015e40), before any change to the checkpoint format; the
expected outputs below were computed from the saved model. Never regenerate the file: it stands for
the files users already have.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rpq_fx

FIXTURE = Path(__file__).parent / "fixtures" / "format1_net.safetensors"


class Format1Net(nn.Module):
    """A conv and a linear layer that convert, a linear that stays dense, and a train-only branch
    (so the file holds a train and an eval graph)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            x = x * 0.5
        return self.fc2(F.relu(self.fc1(x)))


def example_input() -> torch.Tensor:
    return torch.linspace(-1, 1, 72).reshape(2, 1, 6, 6)


EXPECTED = {  # outputs of the saved model on example_input(), float32 values printed exactly
    "eval": [[-0.00022029131650924683, -0.1221100240945816, 0.11075472831726074, -0.08807617425918579],
             [0.03055131621658802, -0.040891148149967194, 0.04883600026369095, 0.014315484091639519]],
    "train": [[0.017757132649421692, -0.08198750764131546, 0.0959906354546547, -0.04447939991950989],
              [0.02982443943619728, -0.035309262573719025, 0.06622567027807236, 0.013211973011493683]],
}


def _outputs(model: nn.Module) -> dict[str, list[list[float]]]:
    """The model's outputs on ``example_input()`` in eval and in train mode."""
    out = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            out[mode] = model(example_input()).tolist()
    return out


def assert_saved_outputs(model: nn.Module) -> None:
    for mode, values in _outputs(model).items():
        # reason: float rounding only; a kernel may sum in another order on another machine
        torch.testing.assert_close(torch.tensor(values), torch.tensor(EXPECTED[mode]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, mode=mode: f"{mode} mode: {m}")


def test_format1_fixture_loads_and_computes_the_saved_outputs():
    loaded = rpq_fx.load(Format1Net().eval(), FIXTURE)
    assert rpq_fx.checkpoint_info(FIXTURE)["format_version"] == 1
    assert [layer.name for layer in loaded.rpq_layers if layer.converted] == ["conv.weight", "fc1.weight"]
    assert_saved_outputs(loaded)


def test_format1_fixture_loads_onto_a_meta_skeleton_in_train_mode():
    with torch.device("meta"):
        skeleton = Format1Net()
    loaded = rpq_fx.load(skeleton, FIXTURE)
    assert not loaded.fc1.weight.codebooks.is_meta
    assert_saved_outputs(loaded)


if __name__ == "__main__":  # how the fixture was made (do not run again: see the module docstring)
    torch.manual_seed(0)
    converted = rpq_fx.convert(Format1Net().eval(), num_codes=16, max_codebook_dim=4, init="kmeans")
    rpq_fx.save(converted, FIXTURE)
    print(_outputs(rpq_fx.load(Format1Net().eval(), FIXTURE)))
