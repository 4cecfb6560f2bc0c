"""Keyword inputs as any Mapping (a tokenizer's BatchEncoding is one, not a dict) wherever rpq_fx runs a
model on an item, items it cannot take refused saying what an item may be, and the integration registered
only where transformers is installed."""

import subprocess
import sys
from collections.abc import Mapping
from types import MappingProxyType

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BatchEncoding, BertConfig, BertModel

import rpq_fx
from rpq_fx._model import as_args, input_items, run_inputs

transformers.logging.set_verbosity_error()


class Keywords(Mapping):
    """A Mapping that is nothing else (no dict, no attribute access)."""

    def __init__(self, values):
        self._values = dict(values)

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


MAPPINGS = (dict, MappingProxyType, BatchEncoding, Keywords)


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), min_size=1, max_size=4, unique=True),
       kind=st.sampled_from(MAPPINGS), extra=st.sampled_from([None, 3, "text"]))
def test_every_mapping_is_keyword_inputs(names, kind, extra):
    values = {name: torch.full((2,), float(i)) for i, name in enumerate(names)}
    values[names[0]] = extra if extra is not None else values[names[0]]  # non-tensor values pass through
    args, kwargs = as_args(kind(values))
    assert args == () and kwargs.keys() == values.keys()
    assert all(kwargs[k] is values[k] for k in values)
    args, kwargs = as_args(kind(values), torch.device("cpu"))
    assert all(kwargs[k] is values[k] or torch.equal(kwargs[k], values[k]) for k in values)


def test_positional_items_and_refusals():
    x = torch.ones(2)
    assert as_args(x) == ((x,), {}) and as_args((x, x)) == ((x, x), {}) and as_args([x]) == ((x,), {})
    with pytest.raises(TypeError, match="a mapping of keyword inputs .*BatchEncoding.*got str 'a sentence': tokenize"):
        as_args("a sentence")
    for item in (None, 3, 2.5, b"bytes"):
        with pytest.raises(TypeError, match="an input item must be a tensor, a tuple or list"):
            as_args(item)
    with pytest.raises(TypeError, match="keys must be the model's keyword names"):
        as_args({0: x})
    model = torch.nn.Linear(2, 3)
    assert torch.equal(run_inputs(model, Keywords({"input": x})), model(x))


def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                vocab_size=512, max_position_embeddings=64)).eval()


def test_batch_encoding_calibrates_exports_and_finetunes(check):
    """What a tokenizer returns works where a dict does: before, BERT failed deep inside with AttributeError('')."""
    model = bert()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    encoded = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    settings = dict(codebook_dim=16, num_codes=16, init="kmeans", progress=False)
    from_encoding = rpq_fx.convert(model, calibration=[encoded], **settings)
    from_dict = rpq_fx.convert(model, calibration=[dict(encoded)], **settings)
    a, b = rpq_fx.decompress(from_encoding), rpq_fx.decompress(from_dict)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    exported = rpq_fx.convert(model, codebook_dim=16, num_codes=16, example_inputs=encoded, progress=False)
    reference = check.dense_reference(model, exported)
    with torch.no_grad():
        check.outputs_close(exported(**encoded).last_hidden_state, reference(**encoded).last_hidden_state)

    losses = rpq_fx.finetune(from_encoding, model, [encoded], steps=2, lr=1e-3)
    assert len(losses) == 2


def test_one_mapping_is_one_item_not_its_keys():
    """``tokenizer(texts, return_tensors="pt")`` passed whole is one batch: iterating it handed over its keys,
    which then failed as text ("tokenize text first") though the user had tokenized."""
    encoded = BatchEncoding({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    assert input_items(encoded, "data") == [encoded]
    assert input_items([encoded, encoded], "data") == [encoded, encoded]
    assert input_items(iter([encoded]), "data") == [encoded]
    with pytest.raises(TypeError, match="finetune: data must be an iterable of input items .*tokenize text first"):
        input_items("some text", "finetune: data")
    model = bert()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2))
    whole = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    converted = rpq_fx.convert(model, codebook_dim=16, num_codes=16, progress=False)
    torch.manual_seed(0)
    as_batch = rpq_fx.finetune(converted, model, whole, steps=2, lr=1e-3, validation=whole, progress=False)
    converted = rpq_fx.convert(model, codebook_dim=16, num_codes=16, progress=False)
    torch.manual_seed(0)
    as_list = rpq_fx.finetune(converted, model, [whole], steps=2, lr=1e-3, validation=[whole], progress=False)
    assert as_batch == as_list
    settings = dict(codebook_dim=16, num_codes=16, init="kmeans", progress=False)
    a = rpq_fx.decompress(rpq_fx.convert(model, calibration=whole, **settings))
    b = rpq_fx.decompress(rpq_fx.convert(model, calibration=[whole], **settings))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registered_only_where_transformers_is_installed():
    script = ("import sys; sys.modules['transformers'] = None; import rpq_fx.integrations as i; i.register(); "
              "assert 'rpq_fx.integrations.transformers' not in sys.modules; "
              "del sys.modules['transformers']; i.register(); "
              "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING; "
              "assert AUTO_QUANTIZER_MAPPING['rpq'].__name__ == 'RPQHfQuantizer'; "
              "assert AUTO_QUANTIZATION_CONFIG_MAPPING['rpq'].__name__ == 'RPQHfConfig'")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_import_rpq_fx_leaves_transformers_unimported_until_the_user_imports_it():
    """``import rpq_fx`` took 2.7 s in transformers.quantizers (and printed the warnings of every quantization
    library transformers found installed, into the CLI's stderr); "rpq" is now registered when transformers is
    imported, before or after rpq_fx, and at once where wrapt is missing."""
    lazy = ("import sys, rpq_fx; assert 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
            "assert AUTO_QUANTIZER_MAPPING['rpq'].__name__ == 'RPQHfQuantizer'")
    after = ("import transformers, rpq_fx; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
             "assert AUTO_QUANTIZER_MAPPING['rpq'].__name__ == 'RPQHfQuantizer'")
    eager = ("import sys; sys.modules['wrapt'] = None; import rpq_fx; "
             "assert 'rpq_fx.integrations.transformers' in sys.modules")
    for script in (lazy, after, eager):
        subprocess.run([sys.executable, "-c", script], check=True)
