"""register_layer: a user's own layer type converted like the built-in ones, fx and in place."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rpq_fx
from rpq_fx import RPQConversionError
from rpq_fx.nn import RPQWeight
from rpq_fx.passes.weight_ops import LAYERS

SETTINGS = dict(codebook_dim=4, num_codes=16)


class Dense(nn.Module):
    """A linear layer that stores its weight ``[in, out]`` as ``kernel`` and reads it with matmul."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(features_in, features_out) / features_in**0.5)
        self.bias = nn.Parameter(torch.randn(features_out))

    def forward(self, x, scale: float = 1.0):
        return (x @ self.kernel + self.bias) * scale


def dense(module: Dense, kernel: torch.Tensor, x, scale: float = 1.0):
    return (x @ kernel + module.bias) * scale


class Mixer(nn.Module):
    """A layer with rows along the weight's first dim ``[out, in]``, a second 2-D parameter it does not
    quantise, and a keyword-only argument."""

    def __init__(self, features: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features) / features**0.5)
        self.gate = nn.Parameter(torch.randn(out, out) / out**0.5)

    def forward(self, x, *, gated: bool = True):
        y = F.linear(x, self.weight)
        return y @ self.gate if gated else y


def mixer(module: Mixer, weight: torch.Tensor, x, *, gated: bool = True):
    y = F.linear(x, weight)
    return y @ module.gate if gated else y


rpq_fx.register_layer(Dense, weight="kernel", rows="last", functional=dense)
rpq_fx.register_layer(Mixer)  # no functional form: its own forward runs, the expanded weight swapped in


class Unregistered(Dense):
    """Not registered (layers are looked up by exact type): fx traces into it, and its kernel stays dense."""


class Net(nn.Module):
    def __init__(self, untraceable: bool = False):
        super().__init__()
        self.untraceable = untraceable
        self.up = Dense(32, 320)
        self.mix = Mixer(320, 300)
        self.down = nn.Linear(300, 320)

    def forward(self, x):
        h = self.up(x, scale=0.5).relu()
        if self.untraceable and h.sum() > 0:  # a branch on values: fx cannot trace it, convert goes in place
            h = -h
        return self.down(self.mix(h, gated=True))


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "in place"])
@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_registered_layers_convert_and_match_the_dense_reference(check, untraceable, init):
    model = Net(untraceable)
    converted = rpq_fx.convert(model, **SETTINGS, init=init, progress=False)
    assert isinstance(converted, rpq_fx.RPQGraphModule) != untraceable
    layers = {layer.name: layer for layer in converted.rpq_layers}
    assert layers["up.kernel"].converted and layers["up.kernel"].transposed and layers["up.kernel"].ops == ("Dense",)
    assert layers["mix.weight"].converted and not layers["mix.weight"].transposed
    assert not layers["mix.gate"].converted and "not as its weight" in layers["mix.gate"].reason
    weights = {name for name, m in converted.named_modules() if isinstance(m, RPQWeight)}
    assert {"up.kernel", "mix.weight", "down.weight"} <= weights
    if not untraceable:  # the functional form is one node of the graph; Mixer's own forward runs in functional_call
        calls = {node.target for node in converted.graph.nodes if node.op == "call_function"}
        assert dense in calls and torch.func.functional_call in calls
    kernel = rpq_fx.decompress(converted)["up.kernel"]
    assert kernel.shape == (32, 320)  # stored as the layer stores it, its rows the 320 outputs
    if init == "kmeans":
        assert torch.nn.functional.cosine_similarity(kernel.flatten(), model.up.kernel.flatten(), dim=0) > 0.8
    check.matches_dense_reference(model, converted, torch.randn(5, 32))


def test_registered_layers_train_save_and_load(check, tmp_path):
    model = Net()
    converted = rpq_fx.convert(model, **SETTINGS, checkpoint=True, progress=False)
    x = torch.randn(5, 32)
    converted(x).square().sum().backward()
    assert converted.up.kernel.codebooks.grad is not None and converted.mix.weight.codebooks.grad is not None
    loaded = rpq_fx.load(Net(), rpq_fx.save(converted, tmp_path / "net.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_an_unregistered_layer_is_traced_into_and_its_weight_stays_dense():
    model = nn.Sequential(Unregistered(32, 320))
    layers = {layer.name: layer for layer in rpq_fx.convert(model, **SETTINGS, progress=False).rpq_layers}
    assert not layers["0.kernel"].converted and "matmul" in layers["0.kernel"].reason


def test_the_built_in_layers_are_in_the_same_registry():
    assert {nn.Linear, nn.Conv2d, nn.Embedding} <= set(LAYERS) and LAYERS[Dense].functional is dense


@pytest.mark.parametrize("module_type, settings, error", [
    (nn.Linear, {}, "Linear is a built-in layer"),
    (int, {}, "must be a torch.nn.Module subclass, got <class 'int'>"),
    (Dense, {"functional": "dense"}, "functional must be None or callable"),
    (Dense, {"weight": "0w"}, "weight must be the name of the layer's weight parameter, got '0w'"),
    (Dense, {"rows": "columns"}, r"rows must be one of \['first', 'last'\], got 'columns'"),
])
def test_register_layer_refuses_bad_arguments(module_type, settings, error):
    with pytest.raises((TypeError, ValueError), match=error):
        rpq_fx.register_layer(module_type, **settings)


class Misnamed(Dense):
    pass


def test_a_registered_weight_the_layer_lacks_is_an_error_naming_the_layer():
    rpq_fx.register_layer(Misnamed, functional=dense)
    with pytest.raises(RPQConversionError, match=r"'0': Misnamed is registered with weight='weight'.*'kernel'"):
        rpq_fx.convert(nn.Sequential(Misnamed(32, 320)), **SETTINGS, progress=False)


class Deep(Dense):
    def __init__(self):
        super().__init__(4, 4)
        self.kernel = nn.Parameter(torch.randn(300, 4, 4))


def test_rows_last_on_a_weight_that_is_not_2d_stays_dense_and_says_why():
    rpq_fx.register_layer(Deep, weight="kernel", rows="last")
    plan = rpq_fx.convert(nn.Sequential(Deep()), **SETTINGS, progress=False).rpq_layers[0]
    assert not plan.converted
    assert plan.reason == "registered with rows='last', which needs a 2-D weight, not [300, 4, 4]"
