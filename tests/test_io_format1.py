"""Committed ``format_version: 1`` checkpoints still load and compute what they computed when saved.

``tests/fixtures/format1_net.safetensors`` (a traced model) and ``format1_inplace.safetensors`` (a
model fx cannot trace, converted in place) were written by ``python tests/test_io_format1.py`` with
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
IN_PLACE_FIXTURE = FIXTURE.with_name("format1_inplace.safetensors")


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


class Format1InPlace(nn.Module):
    """Data-dependent control flow: converted in place, one graph per layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 64)
        self.head = nn.Linear(64, 48)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = -h
        return self.head(h)


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


IN_PLACE_INPUT = torch.linspace(-2, 1, 48).reshape(3, 16)
IN_PLACE_EXPECTED = [  # (first 4 columns, row sums) of the saved model's outputs on IN_PLACE_INPUT and its negation
    ([[0.20641520619392395, -0.06853286176919937, 0.05652901530265808, 0.7734096646308899],
      [-0.0699269101023674, 0.004861988127231598, 0.10896307229995728, 0.2725537419319153],
      [-0.3462691009044647, 0.07825680077075958, 0.16139715909957886, -0.2283022105693817]],
     [6.655797481536865, 2.028550386428833, -2.5986974239349365]),
    ([[0.29107511043548584, -0.21175141632556915, -0.06403981149196625, 0.7231221795082092],
      [0.014732807874679565, -0.13835640251636505, -0.011605709791183472, 0.22226624190807343],
      [-0.26160937547683716, -0.06496161222457886, 0.040828414261341095, -0.27858966588974]],
     [7.062319278717041, 2.4350712299346924, -2.19217586517334]),
]


def test_format1_in_place_fixture_loads_and_computes_the_saved_outputs():
    with torch.device("meta"):
        skeleton = Format1InPlace().eval()
    loaded = rpq_fx.load(skeleton, IN_PLACE_FIXTURE)
    assert type(loaded) is Format1InPlace
    with torch.no_grad():
        for x, (columns, sums) in zip((IN_PLACE_INPUT, -IN_PLACE_INPUT), IN_PLACE_EXPECTED):
            y = loaded(x)
            torch.testing.assert_close(y[:, :4], torch.tensor(columns), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(y.sum(1), torch.tensor(sums), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":  # how the fixtures were made (do not run again: see the module docstring)
    torch.manual_seed(0)
    converted = rpq_fx.convert(Format1Net().eval(), num_codes=16, max_codebook_dim=4, init="kmeans")
    rpq_fx.save(converted, FIXTURE)
    print(_outputs(rpq_fx.load(Format1Net().eval(), FIXTURE)))
    torch.manual_seed(0)
    converted = rpq_fx.convert(Format1InPlace().eval(), num_codes=16, codebook_dim=4)
    rpq_fx.save(converted, IN_PLACE_FIXTURE)
    with torch.no_grad():
        print([(y[:, :4].tolist(), y.sum(1).tolist()) for y in map(converted, (IN_PLACE_INPUT, -IN_PLACE_INPUT))])
