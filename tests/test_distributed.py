"""DDP and FSDP2 training of converted models, on 2 gloo ranks (CPU) under torchrun.

One torchrun launch runs every scenario of tests/distributed_worker.py (the model, data and the 2-rank side of
each check live there) and writes a JSON result; the tests read it, and run the 1-process sides here: DCP
resharding 2 ranks -> 1 and finetune on the concatenated batches.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import rpq_fx
from conftest import assert_matches_dense_reference
from distributed_worker import (FINETUNE, FINETUNE_ARGS, WIDTH, Untraceable, converted, finetune_data,
                                finetune_models)
from rpq_fx.distributed import (RPQDistributedError, broadcast_codes, check_codes_in_sync, index_buffers,
                                original_class, unwrap)
from rpq_fx.nn import RPQWeight

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available"),
              # reason: under pytest -n --dist loadgroup, one xdist worker runs them all: one torchrun launch
              pytest.mark.xdist_group("torchrun")]

WORKER = Path(__file__).with_name("distributed_worker.py")
TRAINING = {  # scenario: the capture path it converts with
    "fx ddp": "torch.fx", "fx fsdp": "torch.fx", "export ddp": "torch.export", "export fsdp": "torch.export",
    "in place ddp": "in place", "in place fsdp blocks": "in place", "module ddp": "module",
    "module fsdp blocks": "module", "checkpoint ddp": "in place", "checkpoint fsdp": "module",
    "compressed ddp": "torch.fx", "compressed fsdp": "module",
    "compile ddp": "torch.fx", "compile fsdp": "in place",
}
OTHERS = ["alone", "codes sync", "checkpoints", "finetune", "convert wrapped"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The output folder of one 2-rank torchrun of every scenario, and its results."""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(WORKER.parent), *sys.path]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(out), *TRAINING, *OTHERS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return out, results


def result(run, name: str) -> dict:
    value = run[1][name]
    assert "error" not in value, value.get("trace", value)
    return value


@pytest.mark.parametrize("name", list(TRAINING))
def test_two_ranks_train_to_what_one_process_does_on_the_whole_batch(run, name):
    got = result(run, name)
    assert got["rpq_path"].startswith(TRAINING[name])
    assert got["moved"] > 1e-2, "every parameter trained"
    assert got["diff"] < 1e-5, f"{name}: parameters {got['diff']:.3g} away from the 1-process run"
    assert got["codes_fixed"], "codes are buffers: training never changes them"
    if name.startswith("compile"):
        assert got["graphs"] > 0, "torch.compile captured graphs"


def test_ranks_that_do_not_reduce_gradients_end_apart(run):
    """The control: each rank trained alone on its half ends far from the 1-process run."""
    assert result(run, "alone")["diff"] > 1e-3


def test_codes_that_differ_between_ranks_raise_and_broadcast_codes_mends_them(run):
    got = result(run, "codes sync")
    assert "'blocks.1.fc2.weight.codes' differ between rank 0 and rank 1" in got["mismatch_error"]
    assert "broadcast_codes" in got["mismatch_error"]
    assert got["broadcast"] == 5
    assert got["ddp_wrap_syncs"], "DDP broadcasts rank 0's codes when it wraps"
    assert got["int16_differ"] and got["int16_broadcast"], "int16 codes (more than 256 codewords) travel too"
    assert got["layout_error"].startswith("check_codes_in_sync: rank 1 holds another model than rank 0: codes ("
                                          "'0.fc1.weight.codes', (9, 512), 'torch.uint8') there against ("
                                          "'blocks.0.fc1.weight.codes', (9, 512), 'torch.uint8') here")


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_save_of_an_fsdp_model_writes_the_unwrapped_models_file_on_rank_0_only(run):
    out, results = run
    got = result(run, "checkpoints")
    assert "fsdp_rank1.safetensors" not in got["files"] and "fsdp_rank0.safetensors" in got["files"]
    # reason: safetensors writes its metadata keys in hash order, which differs between processes
    assert _header_and_data(out / "plain.safetensors") == _header_and_data(out / "fsdp.safetensors")
    assert got["dcp_2_to_2_equal"]
    rank0, rank1 = got["failures"]
    assert rank0.startswith(("FileExistsError", "NotADirectoryError")), rank0
    assert rank1 == f"RuntimeError: save: rank 0 could not write {out}/plain.safetensors/x.safetensors: {rank0}"
    assert got["placements"] == "(Shard(dim=0),)"
    assert got["gather_whole"] == [[5, True], [4, True]], "9 rows gathered whole on rank 0, None on rank 1"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP says it loads in one process
def test_dcp_checkpoint_of_two_shards_loads_into_one_process(run):
    """Resharding 2 ranks -> 1: DCP's sharded checkpoint into an unwrapped converted model, no process group."""
    out, _ = run
    result(run, "checkpoints")
    assert not dist.is_initialized()
    model = converted("in place")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    dcp.load(state, checkpoint_id=out / "dcp")
    model.load_state_dict(state)
    trained = rpq_fx.load(Untraceable(), out / "trained.safetensors")
    expected = trained.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
        if key.endswith("codebooks"):
            assert not torch.equal(value, start[key]), f"{key} holds the trained values"
    torch.manual_seed(0)
    x = torch.randn(4, WIDTH)
    assert_matches_dense_reference(Untraceable(), model, x, leftovers=True)


@pytest.mark.parametrize("name", list(FINETUNE))
def test_finetune_on_two_ranks_equals_one_process_on_the_concatenated_batches(run, name):
    out, results = run
    losses = result(run, "finetune")[name]
    assert not dist.is_initialized()
    _, loss, layers = FINETUNE[name]
    teacher, student = finetune_models(layers)
    data, validation = finetune_data(None)
    expected = rpq_fx.finetune(student, teacher, data, loss=loss, layers=layers, validation=validation,
                               **FINETUNE_ARGS)
    assert losses == pytest.approx(expected, rel=1e-5)
    loaded = rpq_fx.load(finetune_models(layers)[0], out / f"finetune {name}.safetensors")
    trained = dict(student.named_parameters())
    for key, value in loaded.named_parameters():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-5)
    assert not torch.equal(loaded.state_dict()["head.weight.codebooks"],
                           finetune_models()[1].state_dict()["head.weight.codebooks"]), "finetune trained"


def test_finetune_refuses_ranks_that_disagree(run):
    said = result(run, "finetune")
    assert said["values differ"].startswith("finetune: the values of 'head.bias' differ between rank 0 and rank 1")
    assert said["codes differ"].startswith("finetune: the codes 'head.weight.codes' differ between rank 0 and rank 1")
    assert said["validation counts"] == "finetune: every rank needs as many validation items; the ranks hold [1, 2]"


def test_save_dense_refuses_a_sharded_model_and_says_what_to_do(run):
    assert "sharded (FSDP2's fully_shard)" in result(run, "finetune")["save_dense sharded"]
    assert not (run[0] / "dense.safetensors").exists()


def test_convert_refuses_a_model_already_wrapped_in_ddp_or_fsdp(run):
    got = result(run, "convert wrapped")
    for wrapper in ("ddp", "fsdp"):
        assert "RPQConversionError" in got[wrapper] and "convert" in got[wrapper] and "first" in got[wrapper], got


def test_distributed_calls_without_a_process_group_say_how_to_start_one():
    model = converted("torch.fx")
    for call in (check_codes_in_sync, broadcast_codes):
        with pytest.raises(RPQDistributedError, match="initialised torch.distributed process group.*torchrun"):
            call(model)


def test_index_buffers_name_every_code_and_hot_row_index():
    model = nn.ModuleDict({"hot": RPQWeight(4, 8, 50, 16, True, hot_rows=5, hot_codebook_dim=2),
                           "plain": RPQWeight(4, 8, 50)})
    found = index_buffers(model)
    assert set(found) == {"hot.codes", "hot.hot_index", "hot.hot.codes", "plain.codes"}
    assert all(found[name] is model.get_buffer(name) for name in found)
    assert original_class(model) is nn.ModuleDict and unwrap(model) is model
