"""rpq_fx's rows of ``peers.py``: each an ``RPQConfig``, fitted data-aware for the table, and
rebuilt at random (same shapes, same kernels, seconds) when only its timing is refreshed."""

from dataclasses import dataclass

from fit_minilm import BASE as ALLOCATE_BASE  # allocate's candidate sizes and base, as fit_minilm.py measured them
from fit_minilm import SIZES as ALLOCATE_SIZES
from _quality.methods import _finetune  # quality.py's fine-tuning recipe (validated on a held-out quarter)

import rpq_fx

ALLOCATE_BITS = 2.0
RPQ_DIMS, QUICK_RPQ_DIMS = (2, 4, 8), (4,)
FINETUNE_STEPS = 100
CONVERT = "convert, data-aware (calibration=)"
_SHARED = {"num_codes": 256, "shared_codebooks": True, "init": "kmeans", "seed": 0}
_FP16 = {**_SHARED, "codebook_dtype": "float16"}


@dataclass(frozen=True)
class RpqRow:
    method: str
    setting: str
    short: str
    config: dict | None  # RPQConfig.from_dict's; None: allocate's at ``allocate_bits``
    allocate_bits: float | None = None
    allocate_sizes: tuple = tuple(ALLOCATE_SIZES)
    finetune_steps: int = 0  # then rpq_fx.finetune, as quality.py fine-tunes

    def head(self) -> dict:
        return {"library": "rpq_fx", "version": rpq_fx.__version__, "method": self.method,
                "setting": self.setting, "short": self.short}


# Rows beyond the d = 2 / 4 / 8 ones, per task. Digits (98% of its weights in one 1024x512 Linear),
# where peers' 2-bit rows sit at 2.5-4 stored bits: float16 codebooks (their 256 x d values are 3% of
# a 2-bit weight this small), additive codebooks at 3 code bits (d=8, M=3), allocate at quanto
# qint2's 2.506 stored bits over d = 8 / 4 / 2 (rows of 1024 and 288 split into neither 3 nor 6),
# and d=4 fine-tuned.
EXTRA = {"digits": [
    RpqRow(CONVERT, "d=4, K=256, one shared codebook, fp16 codebooks", "d=4 fp16", {"codebook_dim": 4, **_FP16}),
    RpqRow(CONVERT, "d=8, M=3 additive, K=256, shared, fp16 codebooks", "d=8 M=3",
           {"codebook_dim": 8, "additive_codebooks": 3, **_FP16}),
    RpqRow("allocate(2.506) then convert", "d=8 / 4 / 2 per weight, fp16 codebooks", "allocate", None, 2.506,
           tuple({"codebook_dim": d} for d in (8, 4, 2))),
    RpqRow(f"convert, data-aware, then finetune({FINETUNE_STEPS} steps)", "d=4, K=256, one shared codebook",
           "d=4 tuned", {"codebook_dim": 4, **_SHARED}, finetune_steps=FINETUNE_STEPS)]}


def rows(task_name: str, dims, allocate: bool) -> list[RpqRow]:
    """The rpq_fx rows of one task: d in ``dims`` (one shared codebook), the task's ``EXTRA``, and
    ``allocate`` at 2.0 bits on MiniLM."""
    out = [RpqRow(CONVERT, f"d={d}, K=256, one shared codebook", f"d={d}", {"codebook_dim": d, **_SHARED})
           for d in dims]
    out += EXTRA.get(task_name, [])
    if allocate and task_name == "minilm":
        out.append(RpqRow(f"allocate({ALLOCATE_BITS}) then convert",
                          f"{len(ALLOCATE_SIZES)} sizes (d=8..2, hot rows), fp16 codebooks", "allocate", None,
                          ALLOCATE_BITS))
    return out


def fit(row: RpqRow, task, filter_fn):
    """``(converted model, its row's extra fields)``: data-aware on ``task.calibration`` (then
    fine-tuned there), the config as a dict among the fields."""
    if row.config is None:
        config = rpq_fx.allocate(task.model, row.allocate_bits, task.calibration, sizes=list(row.allocate_sizes),
                                 config=rpq_fx.RPQConfig.from_dict(ALLOCATE_BASE), filter_fn=filter_fn,
                                 progress=False)
    else:
        config = rpq_fx.RPQConfig.from_dict(row.config)
    model = rpq_fx.convert(task.model, config=config, calibration=task.calibration, filter_fn=filter_fn,
                           progress=False)
    extra = _finetune(task, model, row.finetune_steps) if row.finetune_steps else {}
    return model, {"config": config.to_dict(), **extra}


def rebuild(config: dict, task, filter_fn):
    """The model a row's ``config`` converts to, drawn at random instead of fitted: the same weights,
    shapes, dtypes and forward paths (values do not change an RPQ layer's time)."""
    if not isinstance(config, dict):
        raise ValueError(f"rebuild: a row's config must be a dict (RPQConfig.to_dict()), got {type(config).__name__}")
    random = {**config, "init": "random",
              "overrides": {k: {**v, "init": "random"} if "init" in v else v
                            for k, v in (config.get("overrides") or {}).items()}}
    return rpq_fx.convert(task.model, config=rpq_fx.RPQConfig.from_dict(random), filter_fn=filter_fn,
                          progress=False)
