"""The data-aware fit of a model in memory, block by block (rpq_fx.fit.sequential.fit_blocks, the default
where block_split allows): each layer's fit gets the statistics the whole-model fit gives it, the model
comes back as it was, and models it would fit differently are run whole; allocate's costs measured from a
weight's block on (BlockReplay) equal the whole model's."""

import copy
import importlib

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import rpq_fx
import rpq_fx.fit
from rpq_fx.fit import sequential
from rpq_fx.fit.sequential import BlockReplay, block_split
from rpq_fx.loss import default_loss, mean_loss

allocate_module = importlib.import_module("rpq_fx.allocate")  # reason: rpq_fx.allocate is also the function


@pytest.fixture
def llama(tiny_llama):
    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama).eval()
    return build


def _bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=16), add_pooling_layer=True).train()


@pytest.fixture(params=["llama", "bert"])
def build(request, llama):
    return llama if request.param == "llama" else _bert


def _items(count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    items = [{"input_ids": torch.randint(0, 128, (2, 8), generator=g),
              "attention_mask": torch.ones(2, 8, dtype=torch.long)} for _ in range(count)]
    items[1]["attention_mask"][0, 5:] = 0  # padding positions are left out of the statistics
    return items


def test_block_by_block_gives_each_fit_the_whole_model_fits_statistics(build, monkeypatch, held_inputs, fit_log):
    """Given the same fitted layers before it (the whole-model fit's, replayed: a k-means code can flip on a
    last-bit difference of a hidden state), each layer gets the same Gram matrix, cross-covariance and lookup
    counts as when every group of layers runs the whole model; the model's blocks, modes and weights stay."""
    model = build()
    before = copy.deepcopy(model.state_dict())
    blocks, modes = list(model.get_submodule(sequential.find_blocks(model))), [m.training for m in model.modules()]
    direct = "*.output.dense" if build is _bert else "*.mlp.down_proj"
    config = rpq_fx.RPQConfig(num_codebooks=4, num_codes=16, init="kmeans", seed=2,
                              overrides={direct: {"asymmetric": False}})
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(rpq_fx.fit, "fit_layer", fit_log.record)
        patch.setattr(sequential, "block_split", lambda *args, **kwargs: None)  # the whole model, every group
        expected = rpq_fx.convert(model, config=config, calibration=_items(), progress=False)
    fit_blocks = sequential.fit_blocks
    monkeypatch.setattr(rpq_fx.fit, "fit_layer", fit_log.replay)
    monkeypatch.setattr(sequential, "fit_blocks", lambda *args, **kwargs: calls.append(args[1]) or fit_blocks(
        *args, **kwargs))
    out = rpq_fx.convert(model, config=config, calibration=_items(), progress=False)
    assert calls == [sequential.find_blocks(model)], "the block-by-block path ran"
    assert len(fit_log.seen) >= 15
    fit_log.assert_same(rtol=1e-5, atol=1e-7)
    kinds = fit_log.kinds()
    assert sum(kinds.values(), ()).count(True) >= len(kinds) and (True, True, False) in kinds.values()
    assert (True, False, False) in kinds.values() and (False, False, True) in kinds.values()
    assert rpq_fx.conversion_record(out).fits == rpq_fx.conversion_record(expected).fits
    assert list(model.get_submodule(sequential.find_blocks(model))) == blocks
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model untouched"


class _Chain(nn.Module):
    """Blocks in an nn.ModuleList; ``reads_middle``: the head reads block 0's output too; ``twice``: the
    blocks run twice; ``between``: a layer between the blocks."""

    def __init__(self, reads_middle=False, twice=False, between=False):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.between = nn.Linear(16, 16) if between else None
        self.head = nn.Linear(16, 4)
        self.reads_middle, self.twice = reads_middle, twice

    def forward(self, x):
        h = self.embed(x)
        outputs = []
        for _ in range(2 if self.twice else 1):
            for i, block in enumerate(self.blocks):
                h = block(h)
                outputs.append(h)
                if i == 0 and self.between is not None:
                    h = self.between(h)
        return self.head(h + outputs[0] if self.reads_middle else h)


def _plans(model):
    converted = rpq_fx.convert(model, num_codebooks=4, num_codes=4)
    return [plan for plan in rpq_fx.conversion_record(converted).layers if plan.converted]


@pytest.mark.parametrize("kind", ["reads_middle", "twice", "between"])
def test_models_whose_blocks_do_not_chain_are_run_whole(kind):
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    assert block_split(_Chain().eval(), x, _plans(_Chain())) == "blocks"
    model = _Chain(**{kind: True}).eval()
    if kind == "between":
        assert block_split(model, x) == "blocks", "the blocks alone chain; the layer between them is what refuses"
    assert block_split(model, x, _plans(model)) is None


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_head_outside_the_blocks_is_fitted_on_the_whole_model(tied, monkeypatch, held_inputs):
    """GPT-2's lm_head is its token embedding: called before the blocks and after them, its fit reads both."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                       tie_word_embeddings=tied)).eval()
    calls = []
    fit_blocks = sequential.fit_blocks
    monkeypatch.setattr(sequential, "fit_blocks", lambda *args, **kwargs: calls.append(1) or fit_blocks(
        *args, **kwargs))
    items = [torch.randint(0, 64, (2, 8)) for _ in range(2)]
    converted = rpq_fx.convert(model, num_codebooks=4, num_codes=16, init="kmeans", calibration=items, progress=False)
    assert calls == ([] if tied else [1])
    assert rpq_fx.conversion_record(converted).fits["lm_head.weight" if not tied else "transformer.wte.weight"] \
        .filled == "kmeans+calibration"


def test_costs_from_a_weights_block_on_equal_the_whole_models(build):
    """allocate's cost of a weight, measured with the blocks before it replaying the dense model's outputs,
    is the loss of the whole model with that weight swapped in (functional_call of the model itself)."""
    model = build().eval()
    items = _items()
    targets = [model(**item) for item in items]
    blocks = sequential.find_blocks(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    names = [n for n in params if params[n].dim() == 2]
    swaps = {name: {name: params[name] + 0.05 * torch.randn(params[name].shape, generator=g)} for name in names}
    with torch.no_grad():
        got = allocate_module._costs(model, items, targets, swaps, blocks)
        want = {name: mean_loss(model, items, targets, default_loss, None, replaced)
                for name, replaced in swaps.items()}
    assert got.keys() == want.keys() and any(f"{blocks}.2." in name for name in got)
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-9), name
    assert len({round(v, 8) for v in want.values()}) > len(names) // 2, "the swaps change the loss"
    assert list(model.get_submodule(blocks)) == list(BlockReplay(model, blocks, items).originals)


def test_allocate_chooses_the_same_sizes_with_costs_from_the_blocks_on(monkeypatch, held_inputs, llama):
    """End to end on a small model: the same costs (to rounding), sizes and conversion as running the model whole
    for every cost; only the number of blocks run differs."""
    model = llama()
    sizes = [{"codebook_dim": 8}, {"codebook_dim": 2}]
    base = rpq_fx.RPQConfig(codebook_dim=4, num_codes=16, shared_codebooks=True, init="kmeans")
    items = _items(2)
    runs = []
    count = lambda module, args: runs.append(1)  # noqa: E731
    hooks = [block.register_forward_pre_hook(count) for block in model.model.layers]
    with monkeypatch.context() as patch:
        patch.setattr(allocate_module, "block_split", lambda *args, **kwargs: None)
        patch.setattr(sequential, "block_split", lambda *args, **kwargs: None)
        whole = allocate_module.size_costs(model, items, sizes=sizes, config=base, progress=False)
    whole_runs, runs[:] = len(runs), []
    blockwise = allocate_module.size_costs(model, items, sizes=sizes, config=base, progress=False)
    for hook in hooks:
        hook.remove()
    assert len(runs) < 0.8 * whole_runs
    assert whole.options.keys() == blockwise.options.keys()
    for name, options in whole.options.items():
        for want, got in zip(options, blockwise.options[name]):
            assert got.size == want.size and got.bits == want.bits
            assert got.cost == pytest.approx(want.cost, rel=1e-3), name
    most = sum(max(o.bits for o in options) for options in whole.options.values()) / sum(whole.values.values())
    for budget in [whole.smallest_bits + (most - whole.smallest_bits) * t for t in (0.001, 0.25, 0.5, 0.75, 1)]:
        assert whole.config(budget) == blockwise.config(budget), budget
