"""``@rpq_fx.rpq(...)`` on a model class, and ``RPQ`` given a class: every instance converts itself at
the end of ``__init__`` (module capture), keeping its class."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rpq_fx
from rpq_fx.convert import rpq
from rpq_fx.nn import RPQConv2d, RPQLinear


class Dense(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3)
        self.fc = nn.Linear(32, width)
        self.out = nn.Linear(width, 8)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.out(F.relu(self.fc(h)))


@rpq(codebook_dim=4, num_codes=16)
class Decorated(Dense):
    pass


def test_every_instance_converts_itself_and_keeps_its_class(check):
    torch.manual_seed(3)
    model = Decorated(width=48)
    assert type(model) is Decorated
    assert type(model.conv) is RPQConv2d and type(model.fc) is RPQLinear and model.fc.out_features == 48
    assert rpq_fx.conversion_record(model).path == "module"
    torch.manual_seed(3)
    twin = Dense(width=48)  # the same dense weights, undecorated
    assert torch.equal(model.fc.bias, twin.fc.bias)
    check.matches_dense_reference(twin, model, torch.randn(2, 4, 8, 8))
    assert Decorated(width=48) is not model  # instances are independent conversions


def test_a_subclass_converts_once_after_its_own_init():
    class Wider(Decorated):
        def __init__(self):
            super().__init__(width=64)
            self.extra = nn.Linear(8, 64)  # added after the decorated __init__ returned

        def forward(self, x):
            return self.extra(super().forward(x))

    model = Wider()
    assert type(model) is Wider and type(model.extra) is RPQLinear and type(model.fc) is RPQLinear
    layers = [layer.name for layer in rpq_fx.conversion_record(model).layers]
    assert layers.count("fc.weight") == 1 and "extra.weight" in layers
    assert model(torch.randn(1, 4, 6, 6)).shape == (1, 64)


def test_rpq_given_a_class_converts_its_instances_with_rpq_defaults():
    class Local(Dense):
        pass

    assert rpq_fx.RPQ(Local) is Local  # decorated, as @rpq_fx.RPQ would
    model = Local(width=512)
    assert type(model) is Local and type(model.fc) is RPQLinear
    record = rpq_fx.conversion_record(model)
    assert record.config.max_codebook_dim == 64
    assert {layer.name: layer.codebook_dim for layer in record.layers if layer.converted} == {"fc.weight": 32}
    assert type(Dense(width=512).fc) is nn.Linear, "the base class is left alone"


def test_decorated_classes_build_on_the_meta_device():
    with torch.device("meta"):
        model = Decorated()
    assert model.fc.weight.codebooks.is_meta and type(model.fc) is RPQLinear


def test_wrong_settings_fail_when_decorating_not_when_building():
    with pytest.raises(TypeError, match="num_codebook"):
        rpq(num_codebook=8)
    with pytest.raises(TypeError, match=r"\['inplace'\] are fixed by the decorator"):
        rpq(num_codebooks=8, inplace=True)
    with pytest.raises(ValueError, match="set exactly one of"):
        rpq(num_codes=16)
    with pytest.raises(TypeError, match="decorates a torch.nn.Module subclass, got <class 'int'>"):
        rpq(num_codebooks=8)(int)
