"""The timm models of the model sweep, converted with ``capture="module"``: class, methods and layers kept.

For each timm model of ``model_sweep.TIMM_MODELS`` (built as the sweep builds it), convert with the
sweep's "small" setting and ``capture="module"``, and check the input model unchanged and the outputs
against the dense reference built from the decompressed weights, then
that the result is the model's own class with its methods and attributes: ``isinstance``,
``forward_features`` (equal to the reference's), ``reset_classifier``, ``pretrained_cfg``, indexing of
its first ``nn.Sequential`` / ``nn.ModuleList`` (``r.blocks[0]``), and that every converted weight
of a built-in layer sits in an ``rpq_fx.nn`` layer. The converted count is compared with the default
(torch.fx) path's in ``results/model_sweep.json``.

    python benchmarks/module_capture_sweep.py [--only NAME ...] [--out DIR]

Writes ``results/module_capture_sweep.md`` and ``.json``.
"""

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_sweep  # noqa: E402

import rpq_fx  # noqa: E402
from rpq_fx.nn.layers import RPQ_LAYERS  # noqa: E402

SETTING = dict(model_sweep.SETTINGS["small"], capture="module")
RPQ_TYPES = tuple(RPQ_LAYERS.values())


def _first_container(model: nn.Module) -> str | None:
    return next((name for name, m in model.named_children() if isinstance(m, (nn.Sequential, nn.ModuleList))
                 and len(m)), None)


def _class_checks(model: nn.Module, converted: nn.Module, reference: nn.Module, x: torch.Tensor) -> list[str]:
    """What the module-captured model lost of the original's class, methods and attributes ([] if nothing)."""
    lost = []
    if type(converted) is not type(model) or not isinstance(converted, type(model)):
        lost.append(f"class {type(converted).__name__}")
    if getattr(converted, "pretrained_cfg", None) != getattr(model, "pretrained_cfg", None):
        lost.append("pretrained_cfg")
    container = _first_container(model)
    if container is not None:
        first = type(getattr(model, container)[0])
        if type(getattr(converted, container)[0]) not in (first, RPQ_LAYERS.get(first)):
            lost.append(f"{container}[0]")
    if hasattr(model, "forward_features"):
        with torch.no_grad():
            actual, expected = converted.forward_features(x), reference.forward_features(x)
        actual, expected = model_sweep._tensors(actual), model_sweep._tensors(expected)
        scale = max(e.abs().max().item() for e in expected)
        if any((a - e).abs().max().item() > model_sweep.TOLERANCE * scale for a, e in zip(actual, expected)):
            lost.append("forward_features differs from the reference")
    if hasattr(converted, "reset_classifier"):
        converted.reset_classifier(3)
        with torch.no_grad():
            if converted(x).shape[-1] != 3:
                lost.append("reset_classifier")
    return lost


def run(name: str, default_rows: dict) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    row = {"model": name, "error": None, "lost": None}
    try:
        built = model_sweep.build(name)
        model = built.model
        reference, before = copy.deepcopy(model), model_sweep._state(model)
        converted = rpq_fx.convert(model, **SETTING)
        after = model.state_dict()
        if after.keys() != before.keys() or any(not torch.equal(after[k], v) for k, v in before.items()):
            raise AssertionError("convert changed its input model")
        totals = rpq_fx.report(converted).totals
        row.update(converted=totals["converted"], layers=totals["layers"], ratio=totals["ratio"], path=totals["path"])
        loaded = reference.load_state_dict(rpq_fx.decompress(converted), strict=False)
        if loaded.unexpected_keys:
            raise AssertionError(f"decompress gave names the original lacks: {loaded.unexpected_keys[:4]}")
        with torch.no_grad():
            row["max_rel_err"], _ = model_sweep._relative_error(converted(*built.inputs), reference(*built.inputs))
        row["rpq_layers"] = sum(isinstance(m, RPQ_TYPES) for m in converted.modules())
        builtin = {f"{n}.weight" for n, m in model.named_modules() if type(m) in RPQ_LAYERS}
        in_layers = {f"{n}.weight" for n, m in converted.named_modules() if isinstance(m, RPQ_TYPES)}
        row["in_graph_parts"] = sum(layer.converted and layer.name in builtin and layer.name not in in_layers
                                    for layer in rpq_fx.conversion_record(converted).layers)
        row["lost"] = _class_checks(model, converted, reference, built.inputs[0])
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        row["error"] = model_sweep._first_line(error)
    default = default_rows.get(name, {}).get("results", {}).get("small", {})
    row["fx_converted"] = default.get("converted")
    row["passed"] = (row["error"] is None and not row["lost"] and row.get("converted", 0) > 0
                     and row["max_rel_err"] is not None and row["max_rel_err"] <= model_sweep.TOLERANCE)
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n, _ in model_sweep.TIMM_MODELS if not args.only or n in args.only]
    sweep = json.loads((Path(__file__).resolve().parent / "results" / "model_sweep.json").read_text())
    default_rows = {r["model"]: r for r in sweep["rows"] if r["capture"] == "default"}
    rows = []
    for name in names:
        rows.append(run(name, default_rows))
        r = rows[-1]
        print(f"{name}: {'pass' if r['passed'] else 'FAIL'} {r.get('converted')}/{r.get('layers')} "
              f"(fx {r['fx_converted']}) err {r.get('max_rel_err')} lost {r['lost']} {r['error'] or ''} "
              f"{r['seconds']:.1f}s", flush=True)
    passed = sum(r["passed"] for r in rows)
    same = sum(r.get("converted") == r["fx_converted"] for r in rows)
    parts = sum(bool(r.get("in_graph_parts")) for r in rows)
    command = "python benchmarks/module_capture_sweep.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    summary = (f"{passed} of {len(rows)} timm models keep class, methods and attributes under capture='module' and "
               f"match the dense reference; {same} of {len(rows)} convert as many weights as the torch.fx path; "
               f"{parts} hold converted built-in layers inside a rewritten graph part")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "module_capture_sweep.json").write_text(json.dumps({"command": command, "summary": summary,
                                                                     "setting": SETTING, "rows": rows}, indent=1))
    lines = [f"# capture='module' on the timm sweep\n\n`{command}` (torch {torch.__version__}, 1 thread; a shared, "
             f"loaded machine: CPU seconds beside wall seconds)\n\n{summary}\n",
             "| model | result | converted | fx path | RPQ layers | in graph parts | max rel err | lost | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else "—"
        lost = r["error"] or ", ".join(r["lost"] or []) or ""
        lines.append(f"| `{r['model']}` | {'pass' if r['passed'] else 'FAIL'} | {r.get('converted')}/{r.get('layers')} "
                     f"| {r['fx_converted']} | {r.get('rpq_layers')} | {r.get('in_graph_parts')} | {err} | {lost} "
                     f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    (args.out / "module_capture_sweep.md").write_text("\n".join(lines) + "\n")
    print(summary)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
