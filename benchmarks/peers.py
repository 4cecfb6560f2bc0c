"""Peers: rpq_fx beside the quantization libraries users would pick instead, on quality.py's three tasks.

Same weights, same data, same process: all-MiniLM-L6-v2 sentence embeddings, EfficientNet-Lite0
crops and the digits CNN (``benchmarks/_quality/tasks.py``; the same selected weights for every
method). Peers (``benchmarks/_peers/methods.py``): torchao (Int8 / Intx weight-only, int4 tiles,
its prototype codebook and LUT quantizers, GPTQ), optimum-quanto (qint8/4/2), HQQ (4/3/2 bits,
group 64), GPTQModel and llmcompressor (data-aware GPTQ), quality.py's per-row RTN, and rpq_fx's
data-aware conversion (``benchmarks/_peers/rpq.py``: d = 2, 4, 8, one shared codebook, K = 256, a
task's extra settings, ``rpq_fx.allocate`` at 2.0 bits on MiniLM). A peer that fails is a row with
its error. Per row: stored bits per weight counted from the tensors the library keeps, layers
covered, quality, model MiB, quantization wall / CPU seconds, and CPU latency over dense fp32 at
batch 1 and 32, interleaved with dense, with the load average when it was timed.

Writes ``peers.md``, ``peers.json`` and ``peers.png`` to ``benchmarks/results/`` (or ``--out``).

    python benchmarks/peers.py [--quick] [--tasks minilm efficientnet digits] [--no-allocate]
                               [--rpq-dims 2 4 8] [--peers LIBRARY ...] [--threads N] [--add] [--out DIR]
    python benchmarks/peers.py --latency-only [--tasks ...] [--threads N]   # retime peers.json's rows
    python benchmarks/peers.py --render

``--add`` keeps the other tasks of an earlier ``peers.json`` in ``--out`` and writes them with this run's.
``--latency-only`` keeps every quality and size number of ``peers.json`` and measures only the latency
columns again (minutes, not the hour of fitting): rpq_fx rows are rebuilt from their stored config at
random (same weights, shapes and forward paths), peers re-quantized; each rebuilt model must store the
bits its row says. ``--render`` only rewrites ``peers.md`` / ``peers.png`` from ``peers.json``.
"""

import argparse
import copy
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, load, machine, table, write  # noqa: E402
from _peers import output, rpq  # noqa: E402
from _peers.methods import PEERS  # noqa: E402
from _peers.storage import covered, model_bytes, stored_bits_per_weight  # noqa: E402
from _peers.timing import example, latency  # noqa: E402
from _quality.methods import run_rtn, weight_filter  # noqa: E402
from _quality.tasks import BUILDERS, SELECTION  # noqa: E402

import rpq_fx  # noqa: E402

MIB = 2**20
TASKS = {"minilm": dict(n_eval=1000, n_calib=256), "efficientnet": dict(n_eval=256, n_calib=128),
         "digits": dict()}
QUICK_TASKS = {"minilm": dict(n_eval=64, n_calib=32), "efficientnet": dict(n_eval=16, n_calib=32),
               "digits": dict(epochs=3, n_calib=64)}
# reason: a timing reads only the calibration inputs; EfficientNet's (crops drawn with seed 1) do not
# depend on n_eval, MiniLM's lines do (they follow the evaluation lines), the digits CNN must be retrained
LATENCY_TASKS = {**TASKS, "efficientnet": dict(n_eval=16, n_calib=128)}
PLOT_METRIC = {"minilm": "cosine", "efficientnet": "top1", "digits": "accuracy"}
# budgets checked per task: the plotted quality metric, and on digits (450 test images, saturated)
# agreement with the dense model's predictions as well
TARGET_METRICS = {"digits": ("accuracy", "agreement")}
RTN, RTN_BITS = "RTN (here)", (8, 4, 2)
ROUNDS, QUICK_ROUNDS = 5, 2
NOTES = "## Where a peer wins, and why"  # peers.md's hand-written section from here on survives a rewrite


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _short_error(error: BaseException, limit: int = 220) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class Runner:
    """One task: the dense reference, then one row per method, each measured the same way."""

    def __init__(self, task, rounds: int):
        self.task, self.rounds, self.rows = task, rounds, []
        self.inputs = {1: example(task, 1), 32: example(task, 32)}
        self.numel = sum(p.numel() for p in task.weights.values())
        self.started = {"date": _now(), "command": command(), "threads": torch.get_num_threads(), "load_before": load()}

    def timings(self, model) -> dict:
        """Latency columns of ``model`` against the dense model (``model`` is the dense one: ratio 1), and
        the 1-minute load average just before."""
        out = {"lat_load": os.getloadavg()[0]}
        for batch, x in self.inputs.items():
            t = latency(self.task.model, model, x, rounds=self.rounds)
            mine = "dense_" if model is self.task.model else ""
            out.update({f"lat{batch}": 1.0 if mine else t["ratio"], f"lat{batch}_ms": t[f"{mine}ms"],
                        f"lat{batch}_cpu_ms": t[f"{mine}cpu_ms"]})
        return out

    def dense(self) -> None:
        task = self.task
        self.rows.append({"library": "dense", "version": torch.__version__, "method": "dense", "setting": "fp32",
                          "short": "fp32", "bits_per_weight": 32.0, "covered": "—", "error": None,
                          "model_mib": model_bytes(task.model) / MIB, **task.evaluate(task.model),
                          **self.timings(task.model)})

    def timing_meta(self) -> dict:
        """When, with how many threads and at what load the latency columns were measured."""
        loads = [r["lat_load"] for r in self.rows if r.get("lat_load") is not None]
        return {**self.started, "load_after": load(), "lat_load_min": min(loads, default=None),
                "lat_load_max": max(loads, default=None)}

    def measure(self, head: dict, build, rpq: bool = False) -> None:
        """Quantize a copy of the dense model with ``build`` (returning the model and extra row fields),
        then evaluate, size and time it; an exception anywhere makes the row an error row."""
        task, row, start = self.task, dict(head, error=None), time.perf_counter()
        label = f"{row['library']} {row['method']} {row['setting']}"
        try:
            (model, extra), row["quant_s"], row["quant_cpu_s"] = _timed(build)
            row.update(extra)
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
            row.update(self.timings(model))
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
        self.rows.append({"library": RTN, "version": "benchmarks/_quality/rtn.py", "error": None,
                          "method": "per-row symmetric RTN (fake-quantised)",
                          "setting": f"int{bits}, fp32 scale per row",
                          "short": f"int{bits}", "bits_per_weight": base["bits_per_weight"],
                          "covered": f"{len(self.task.weights)} of {len(self.task.weights)}", "covered_weights": 1.0,
                          "model_mib": base["model_mib"], **{k: base[k] for k in self.task.metrics},
                          "quant_s": None, "quant_cpu_s": None, "lat1": None, "lat32": None,
                          "seconds": time.perf_counter() - start})


def _peer_head(peer) -> dict:
    return {"library": peer.library, "version": peer.version, "method": peer.method, "setting": peer.setting,
            "short": peer.setting.split(",")[0].split(" (")[0], "data_aware": peer.data_aware}


def _key(row: dict) -> tuple:
    return row["library"], row["method"], row["setting"]


def _task_entry(name: str, task, runner: Runner, seconds: float) -> dict:
    numel, total = runner.numel, sum(p.numel() for p in task.model.parameters())
    notes = (f"{task.notes} Selected weights: {len(task.weights)}, {numel:,} of the model's {total:,} parameters; "
             "stored bits are counted over these, a selected weight a peer leaves dense counting its 32 bits.")
    return {"name": name, "title": task.title, "notes": notes, "metrics": task.metrics,
            "plot_metric": PLOT_METRIC[name], "target_metrics": list(TARGET_METRICS.get(name, [PLOT_METRIC[name]])),
            "rows": runner.rows, "latency": runner.timing_meta(), "seconds": seconds}


def _chosen(head: dict, only) -> bool:
    """Whether a row is in this run: every row, or those whose "library method setting" holds one of ``only``."""
    return not only or any(o in f"{head['library']} {head['method']} {head['setting']}" for o in only)


def merge_rows(earlier: dict, new: dict) -> dict:
    """``earlier`` (a task of peers.json) with ``new``'s rows (dense aside) in place of those of the same
    library, method and setting, the others kept; each row keeps its ratios to its own run's dense."""
    fresh = {_key(r): r for r in new["rows"] if r["library"] != "dense"}
    rows = [fresh.pop(_key(r), r) for r in earlier["rows"]]
    return {**earlier, "rows": rows + list(fresh.values())}


def run_task(name: str, quick: bool, allocate: bool, peers: list, dims, only=()) -> dict:
    start = time.perf_counter()
    task = BUILDERS[name](**(QUICK_TASKS if quick else TASKS)[name])
    runner = Runner(task, rounds=QUICK_ROUNDS if quick else ROUNDS)
    runner.dense()
    chosen = weight_filter(task.weights)
    print(f"== {name}: built in {time.perf_counter() - start:.0f} s; {len(task.weights)} weights", flush=True)
    for row in rpq.rows(name, dims, allocate):
        if _chosen(row.head(), only):
            runner.measure(row.head(), lambda row=row: rpq.fit(row, task, chosen), rpq=True)
    for bits in RTN_BITS if not only else ():
        runner.rtn(bits)
    for peer in peers:
        if _chosen(_peer_head(peer), only):
            runner.measure(_peer_head(peer), lambda peer=peer: (peer.run(copy.deepcopy(task.model), task), {}))
    return _task_entry(name, task, runner, time.perf_counter() - start)


def refresh_latency(entry: dict, quick: bool = False) -> None:
    """Measure ``entry``'s (a task of ``peers.json``) latency columns again, in place: every row that
    ran, rebuilt (rpq_fx at random from its config, peers re-quantized) and checked to store the bits
    its row says; a row that cannot be rebuilt keeps no latency and says why (``lat_error``)."""
    name = entry["name"]
    task = BUILDERS[name](**(QUICK_TASKS if quick else LATENCY_TASKS)[name])
    runner = Runner(task, rounds=QUICK_ROUNDS if quick else ROUNDS)
    chosen, peers = weight_filter(task.weights), {_key(_peer_head(p)): p for p in PEERS}
    print(f"== {name}: retiming its rows", flush=True)
    for row in entry["rows"]:
        if row.get("error") or row["library"] == RTN:
            continue  # failed rows, and RTN's fake-quantised ones, have no latency
        row.pop("lat_error", None)
        try:
            if row["library"] == "dense":
                model = task.model
            elif row["library"] == "rpq_fx":
                if not isinstance(row.get("config"), dict):
                    raise ValueError("the row keeps no rpq_fx config (an older run): rerun its task to store one")
                model = rpq.rebuild(row["config"], task, chosen)
            elif _key(row) in peers:
                model = peers[_key(row)].run(copy.deepcopy(task.model), task)
            else:
                raise ValueError(f"no peer in _peers/methods.py is {_key(row)}")
            model.eval()
            bits = stored_bits_per_weight(task.model, model, task.weights)
            if abs(bits - row["bits_per_weight"]) > 1e-6:
                raise ValueError(f"the rebuilt model stores {bits:.6f} bits per weight, "
                                 f"the row {row['bits_per_weight']:.6f}")
            row.update(runner.timings(model))
        except Exception as error:
            row.update({"lat1": None, "lat32": None, "lat_load": None, "lat_error": _short_error(error)})
        runner.rows.append(row)
        print(f"  {row['library']} {row['setting']}: " + (f"ERROR {row['lat_error']}" if row.get("lat_error") else
              f"latency b1 {row['lat1']:.2f} b32 {row['lat32']:.2f} (load {row['lat_load']:.2f})"), flush=True)
        gc.collect()
    entry["latency"] = runner.timing_meta()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, d=4 only, no allocate")
    parser.add_argument("--tasks", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--no-allocate", action="store_true", help="skip rpq_fx.allocate on MiniLM (~7 CPU-min)")
    parser.add_argument("--peers", nargs="+", metavar="LIBRARY", help="only these peer libraries (e.g. hqq torchao)")
    parser.add_argument("--rpq-dims", nargs="*", type=int,
                        help=f"rpq_fx's codebook_dim values (default {rpq.RPQ_DIMS}; none: no rpq_fx rows)")
    parser.add_argument("--add", action="store_true", help="keep the other tasks of an earlier peers.json in --out")
    parser.add_argument("--rows", nargs="+", metavar="TEXT",
                        help="only the rows whose 'library method setting' holds one of these; with --add they "
                             "replace the same rows of the earlier peers.json's task, keeping its others")
    parser.add_argument("--latency-only", action="store_true",
                        help="retime the rows of --out's peers.json (of --tasks), keeping every other number")
    parser.add_argument("--render", action="store_true", help="only rewrite peers.md / .png from peers.json")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    started = load()
    if args.render or args.latency_only:
        path = args.out / "peers.json"
        if not path.exists():
            parser.error(f"{path} does not exist: run the tasks first")
        earlier = json.loads(path.read_text())
        if args.latency_only:
            for entry in earlier["tasks"]:
                if entry["name"] in args.tasks:
                    refresh_latency(entry, args.quick)
            output.write_json(path, earlier["meta"], earlier["tasks"])
        return render(args.out, earlier["meta"], earlier["tasks"], started)
    peers = [p for p in PEERS if not args.peers or p.library in args.peers]
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    dims = args.rpq_dims if args.rpq_dims is not None else (rpq.QUICK_RPQ_DIMS if args.quick else rpq.RPQ_DIMS)
    tasks = [run_task(name, args.quick, not (args.quick or args.no_allocate), peers, dims, args.rows or ())
             for name in args.tasks]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    run = {"command": command(), "tasks": args.tasks, "wall_s": wall, "cpu_s": cpu, "load_before": started,
           "load_after": load(), "date": _now(), "quick": args.quick, "threads": torch.get_num_threads(),
           "rows": args.rows}
    meta = {"machine": machine(), "torch": torch.__version__, "selection": SELECTION, "runs": [run]}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.add and (args.out / "peers.json").exists():
        earlier = json.loads((args.out / "peers.json").read_text())
        if args.rows:  # some rows again: the earlier runs made the rest
            meta["runs"] = earlier["meta"]["runs"] + meta["runs"]
            new = {t["name"]: t for t in tasks}
            tasks = [merge_rows(t, new.pop(t["name"])) if t["name"] in new else t for t in earlier["tasks"]]
            tasks += list(new.values())
        else:
            meta["runs"] = [r for r in earlier["meta"]["runs"] if set(r["tasks"]) - set(args.tasks)] + meta["runs"]
            tasks = [t for t in earlier["tasks"] if t["name"] not in args.tasks] + tasks
    output.write_json(args.out / "peers.json", meta, tasks)
    render(args.out, meta, tasks, started)


def render(out: Path, meta: dict, tasks: list[dict], started: str) -> None:
    """peers.png and peers.md from the runs' ``meta`` and ``tasks``."""
    output.plot(out / "peers.png", tasks)
    runs = "\n".join(f"- `{r['command']}` ({', '.join(r['tasks'])}): {r['date']}, wall {r['wall_s'] / 60:.1f} min, "
                      f"CPU {r['cpu_s'] / 60:.1f} min"
                      + (f", torch threads {r['threads']}" if r.get("threads") else "")
                      + f", load average {r['load_before']} before, {r['load_after']} after"
                      + (" (--quick)" if r["quick"] else "")
                      + (f"; only the rows matching {r['rows']}" if r.get("rows") else "") for r in meta["runs"])
    targets = [output.targets_text(t, key) for t in tasks for key in t.get("target_metrics", [t["plot_metric"]])]
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
            "process (inputs: the first calibration inputs, batch 1 and 32); each task says when they were timed, "
            "with how many threads and at what load. On a shared machine they are noise: `python "
            "benchmarks/peers.py --latency-only` retimes every row on a quiet one in minutes, keeping the other "
            "numbers (rpq_fx rows rebuilt at random from their stored config: the same shapes and forward paths; "
            "peers re-quantized).\n\n**Targets**\n\n" + "\n".join(targets) + "\n"
            + "\n".join(output.task_table(t, table) for t in tasks))
    previous = out / "peers.md"
    notes = previous.read_text().partition(NOTES)[2] if previous.exists() else ""
    body += f"\n{NOTES}{notes}" if notes else ""  # the hand-written reading of the numbers, kept
    write("peers", "rpq_fx against the quantization libraries users would pick instead", body, started, directory=out)


if __name__ == "__main__":
    main()
