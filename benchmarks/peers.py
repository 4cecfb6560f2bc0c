"""Peers: rpq_fx beside the quantization libraries users would pick instead, on quality.py's three tasks.

Same weights, same data, same process: all-MiniLM-L6-v2 sentence embeddings, EfficientNet-Lite0
crops and the digits CNN (``benchmarks/_quality/tasks.py``; the same selected weights for every
method). Peers (``benchmarks/_peers/methods.py``): torchao (Int8 / Intx weight-only, int4 tiles,
its prototype codebook and LUT quantizers, GPTQ), optimum-quanto (qint8/4/2), HQQ (4/3/2 bits,
group 64), GPTQModel and llmcompressor (data-aware GPTQ), quality.py's per-row RTN, and rpq_fx's
data-aware conversion (d = 2, 4, 8, one shared codebook, K = 256) plus ``rpq_fx.allocate`` at 2.0
bits on MiniLM. A peer that fails is a row with its error. Per row: stored bits per weight counted
from the tensors the library keeps, layers covered, quality, model MiB, quantization wall / CPU
seconds, and CPU latency over dense fp32 at batch 1 and 32, interleaved with dense.

Writes ``peers.md``, ``peers.json`` and ``peers.png`` to ``benchmarks/results/`` (or ``--out``).

    python benchmarks/peers.py [--quick] [--tasks minilm efficientnet digits] [--no-allocate]
                               [--rpq-dims 2 4 8] [--peers LIBRARY ...] [--add] [--out DIR]

``--add`` keeps the other tasks of an earlier ``peers.json`` in ``--out`` and writes them with this run's;
``--render`` only rewrites ``peers.md`` / ``peers.png`` from ``peers.json``.
"""

import argparse
import copy
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, load, machine, table, write  # noqa: E402
from _peers import output  # noqa: E402
from _peers.methods import PEERS  # noqa: E402
from _peers.storage import covered, model_bytes, stored_bits_per_weight  # noqa: E402
from _peers.timing import example, latency  # noqa: E402
from _quality.methods import run_rtn, weight_filter  # noqa: E402
from _quality.tasks import BUILDERS, SELECTION  # noqa: E402
from fit_minilm import BASE as ALLOCATE_BASE  # noqa: E402
from fit_minilm import SIZES as ALLOCATE_SIZES  # noqa: E402

import rpq_fx  # noqa: E402

MIB = 2**20
TASKS = {"minilm": dict(n_eval=1000, n_calib=256), "efficientnet": dict(n_eval=256, n_calib=128),
         "digits": dict()}
QUICK_TASKS = {"minilm": dict(n_eval=64, n_calib=32), "efficientnet": dict(n_eval=16, n_calib=32),
               "digits": dict(epochs=3, n_calib=64)}
PLOT_METRIC = {"minilm": "cosine", "efficientnet": "top1", "digits": "accuracy"}
RPQ_DIMS, QUICK_RPQ_DIMS = (2, 4, 8), (4,)
RTN_BITS = (8, 4, 2)
ALLOCATE_BITS = 2.0
NOTES = "## Where a peer wins, and why"  # peers.md's hand-written section from here on survives a rewrite


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _short_error(error: BaseException, limit: int = 220) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Runner:
    """One task: the dense reference, then one row per method, each measured the same way."""

    def __init__(self, name: str, task, rounds: int):
        self.task, self.rounds, self.rows = task, rounds, []
        self.inputs = {1: example(task, 1), 32: example(task, 32)}
        self.numel = sum(p.numel() for p in task.weights.values())
        dense = {"library": "dense", "version": torch.__version__, "method": "dense", "setting": "fp32",
                 "short": "fp32", "bits_per_weight": 32.0, "covered": "—", "model_mib": model_bytes(task.model) / MIB,
                 **task.evaluate(task.model)}
        for batch, x in self.inputs.items():
            t = latency(task.model, task.model, x, rounds=rounds)
            dense.update({f"lat{batch}": 1.0, f"lat{batch}_ms": t["dense_ms"], f"lat{batch}_cpu_ms": t["dense_cpu_ms"]})
        self.rows.append(dense)

    def measure(self, head: dict, build, rpq: bool = False) -> None:
        """Quantize a copy of the dense model with ``build``, then evaluate, size and time it; an
        exception anywhere makes the row an error row."""
        task, row, start = self.task, dict(head, error=None), time.perf_counter()
        label = f"{row['library']} {row['method']} {row['setting']}"
        try:
            model, row["quant_s"], row["quant_cpu_s"] = _timed(
                (lambda: build()) if rpq else (lambda: build(copy.deepcopy(task.model), task)))
            model.eval()
            row.update(task.evaluate(model))
            row["bits_per_weight"] = stored_bits_per_weight(task.model, model, task.weights)
            if rpq:
                report = rpq_fx.report(model)
                names = [r["layer"] for r in report.rows if r["K"] is not None]
                row["report_bits_per_weight"] = report.totals.get("bits_per_weight")
            else:
                names = covered(model, task.weights)
            row["covered"] = f"{len(names)} of {len(task.weights)}"
            row["covered_weights"] = sum(task.weights[n].numel() for n in names if n in task.weights) / self.numel
            row["model_mib"] = model_bytes(model) / MIB
            for batch, x in self.inputs.items():
                t = latency(task.model, model, x, rounds=self.rounds)
                row.update({f"lat{batch}": t["ratio"], f"lat{batch}_ms": t["ms"], f"lat{batch}_cpu_ms": t["cpu_ms"]})
            del model
        except Exception as error:  # a peer that fails is a result: its row says why
            row["error"] = _short_error(error)
        gc.collect()
        row["seconds"] = time.perf_counter() - start
        self.rows.append(row)
        key = PLOT_METRIC[task.name]
        print(f"  {label}: " + (f"ERROR {row['error']}" if row["error"] else
              f"{row['bits_per_weight']:.3f} bits, {key} {row[key]:.4f}, covered {row['covered']}, "
              f"quantize {row['quant_s']:.1f} s, latency b1 {row['lat1']:.2f} b32 {row['lat32']:.2f}")
              + f" ({row['seconds']:.0f} s)", flush=True)

    def rtn(self, bits: int) -> None:
        start = time.perf_counter()
        base = run_rtn(self.task, bits)
        self.rows.append({"library": "RTN (here)", "version": "benchmarks/_quality/rtn.py", "error": None,
                          "method": "per-row symmetric RTN (fake-quantised)",
                          "setting": f"int{bits}, fp32 scale per row",
                          "short": f"int{bits}", "bits_per_weight": base["bits_per_weight"],
                          "covered": f"{len(self.task.weights)} of {len(self.task.weights)}", "covered_weights": 1.0,
                          "model_mib": base["model_mib"], **{k: base[k] for k in self.task.metrics},
                          "quant_s": None, "quant_cpu_s": None, "lat1": None, "lat32": None,
                          "seconds": time.perf_counter() - start})


def run_task(name: str, quick: bool, allocate: bool, peers: list, dims) -> dict:
    start = time.perf_counter()
    task = BUILDERS[name](**(QUICK_TASKS if quick else TASKS)[name])
    runner = Runner(name, task, rounds=2 if quick else 5)
    chosen = weight_filter(task.weights)
    print(f"== {name}: built in {time.perf_counter() - start:.0f} s; {len(task.weights)} weights", flush=True)
    version = rpq_fx.__version__
    for d in dims:
        head = {"library": "rpq_fx", "version": version, "method": "convert, data-aware (calibration=)",
                "setting": f"d={d}, K=256, one shared codebook", "short": f"d={d}"}
        runner.measure(head, lambda d=d: rpq_fx.convert(
            task.model, codebook_dim=d, num_codes=256, shared_codebooks=True, init="kmeans",
            calibration=task.calibration, filter_fn=chosen, seed=0, progress=False), rpq=True)
    if allocate and name == "minilm":
        head = {"library": "rpq_fx", "version": version, "method": f"allocate({ALLOCATE_BITS}) then convert",
                "setting": f"{len(ALLOCATE_SIZES)} sizes (d=8..2, hot rows), fp16 codebooks", "short": "allocate"}

        def allocated():
            config = rpq_fx.allocate(task.model, ALLOCATE_BITS, task.calibration, sizes=ALLOCATE_SIZES,
                                     config=rpq_fx.RPQConfig.from_dict(ALLOCATE_BASE), filter_fn=chosen, progress=False)
            return rpq_fx.convert(task.model, config=config, calibration=task.calibration, filter_fn=chosen,
                                  progress=False)
        runner.measure(head, allocated, rpq=True)
    for bits in RTN_BITS:
        runner.rtn(bits)
    for peer in peers:
        head = {"library": peer.library, "version": peer.version, "method": peer.method, "setting": peer.setting,
                "short": peer.setting.split(",")[0].split(" (")[0], "data_aware": peer.data_aware}
        runner.measure(head, peer.run)
    numel, total = runner.numel, sum(p.numel() for p in task.model.parameters())
    notes = (f"{task.notes} Selected weights: {len(task.weights)}, {numel:,} of the model's {total:,} parameters; "
             "stored bits are counted over these, a selected weight a peer leaves dense counting its 32 bits.")
    return {"name": name, "title": task.title, "notes": notes, "metrics": task.metrics,
            "plot_metric": PLOT_METRIC[name], "rows": runner.rows, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, d=4 only, no allocate")
    parser.add_argument("--tasks", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--no-allocate", action="store_true", help="skip rpq_fx.allocate on MiniLM (~7 CPU-min)")
    parser.add_argument("--peers", nargs="+", metavar="LIBRARY", help="only these peer libraries (e.g. hqq torchao)")
    parser.add_argument("--rpq-dims", nargs="*", type=int,
                        help=f"rpq_fx's codebook_dim values (default {RPQ_DIMS}; none: no rpq_fx rows)")
    parser.add_argument("--add", action="store_true", help="keep the other tasks of an earlier peers.json in --out")
    parser.add_argument("--render", action="store_true", help="only rewrite peers.md / .png from peers.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.render:
        earlier = json.loads((args.out / "peers.json").read_text())
        return render(args.out, earlier["meta"], earlier["tasks"], load())
    peers = [p for p in PEERS if not args.peers or p.library in args.peers]
    started, start, cpu = load(), time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    dims = args.rpq_dims if args.rpq_dims is not None else (QUICK_RPQ_DIMS if args.quick else RPQ_DIMS)
    tasks = [run_task(name, args.quick, not (args.quick or args.no_allocate), peers, dims) for name in args.tasks]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    run = {"command": command(), "tasks": args.tasks, "wall_s": wall, "cpu_s": cpu, "load_before": started,
           "load_after": load(), "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick}
    meta = {"machine": machine(), "torch": torch.__version__, "selection": SELECTION, "runs": [run]}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.add and (args.out / "peers.json").exists():
        earlier = json.loads((args.out / "peers.json").read_text())
        meta["runs"] = [r for r in earlier["meta"]["runs"] if set(r["tasks"]) - set(args.tasks)] + meta["runs"]
        tasks = [t for t in earlier["tasks"] if t["name"] not in args.tasks] + tasks
    output.write_json(args.out / "peers.json", meta, tasks)
    render(args.out, meta, tasks, started)


def render(out: Path, meta: dict, tasks: list[dict], started: str) -> None:
    """peers.png and peers.md from the runs' ``meta`` and ``tasks``."""
    output.plot(out / "peers.png", tasks)
    runs = "\n".join(f"- `{r['command']}` ({', '.join(r['tasks'])}): {r['date']}, wall {r['wall_s'] / 60:.1f} min, "
                      f"CPU {r['cpu_s'] / 60:.1f} min, load average {r['load_before']} before, {r['load_after']} after"
                      + (" (--quick)" if r["quick"] else "") for r in meta["runs"])
    body = (f"Runs:\n\n{runs}\n\n"
            "Raw numbers: `peers.json`; plot: `peers.png`.\n\n![quality against stored bits](peers.png)\n\n"
            f"**Weights quantised** (every method is offered the same ones): {SELECTION}. A library that handles "
            "only some layer types leaves the rest dense, and those count 32 bits (HQQ, torchao's codebook and GPTQ: "
            "`nn.Linear`; torchao's Int8 / Intx configs: `nn.Linear` and `nn.Embedding`; quanto: `nn.Linear` and "
            "convolutions).\n\n"
            "**Stored bits per weight**: how much the whole model's stored tensors changed, over the selected "
            "weights' count: every parameter, buffer and inner tensor of a tensor subclass (torchao's qdata / "
            "scale / zero_point, quanto's packed data / scale / shift), HQQ's `meta` scales and zeros, rpq_fx's "
            "codes and codebooks, each storage counted once, from its bytes; unpacked int4 in int8 counts 8 bits. "
            "RTN is fake-quantised here: its bits are what it would store (`bits` + a fp32 scale per row), no "
            "latency. `quantize s`: wall (CPU) seconds of the quantization call(s), calibration included. Latency "
            "ratios: median per-call wall time over dense fp32's, the two measured in alternating blocks in this "
            "process (inputs: the first calibration inputs, batch 1 and 32).\n\n**Targets**\n\n"
            + "\n".join(output.targets_text(t) for t in tasks) + "\n"
            + "\n".join(output.task_table(t, table) for t in tasks))
    previous = out / "peers.md"
    notes = previous.read_text().partition(NOTES)[2] if previous.exists() else ""
    body += f"\n{NOTES}{notes}" if notes else ""  # the hand-written reading of the numbers, kept
    write("peers", "rpq_fx against the quantization libraries users would pick instead", body, started, directory=out)


if __name__ == "__main__":
    main()
