"""``rpq-fx``: convert a model and save it, report on a checkpoint, inspect a checkpoint.

    rpq-fx convert timm:resnet18 --num-codebooks 8 --out out/resnet18
    rpq-fx report out/resnet18/model.safetensors
    rpq-fx inspect out/resnet18/model.safetensors --out out/inspect

Also ``python -m rpq_fx``. Errors are one line on stderr and a non-zero exit status (1 for a model
or file that cannot be handled, 2 for a bad command line); ``--traceback`` shows the whole trace.
"""

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ._optional import require
from ._progress import draws, note, progress_bar
from .config import RPQ_MAX_CODEBOOK_DIM

__all__ = ["main", "build_model", "SPEC_HELP", "CHECKSUM_HELP"]

CHECKPOINT = "model.safetensors"
BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away

SPEC_HELP = """\
SPEC names the model to build (with random weights unless the source has them):
  timm:NAME            a timm model, e.g. timm:resnet18 (pretrained=False: nothing is downloaded)
  hf:PATH              a Hugging Face transformers model from a folder (config.json, and weights
                       if the folder has them) or from a config.json file; the class is the
                       config's "architectures" entry, else AutoModel
  MODULE:FACTORY       a Python callable returning an nn.Module, e.g. mypkg.models:build_net or
  FILE.py:FACTORY      path/to/models.py:build_net (the current folder is importable)
"""


CHECKSUM_HELP = """\
Checksums: a checkpoint's SHA-256 digests (of its metadata and of every tensor) detect accidental
damage, not edits: anyone who changes a file can recompute them, so they prove integrity, not who
wrote it. Reading does not trust them: every code, index, shape, offset, dtype and the metadata's
structure is checked, a crafted file gives one error line, and no code the file names is run (a
SPEC recorded in the file is only shown; --model builds the one you type).
"""


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------------
# model specs


def _factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CLIError(f"model spec {spec!r} is not timm:NAME, hf:PATH or MODULE:FACTORY")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise CLIError(f"model spec {spec!r}: no such file {file}")
        loader = importlib.util.spec_from_file_location(f"_rpq_fx_spec_{file.stem}", file)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise CLIError(f"model spec {spec!r}: cannot import {module_name!r} ({error})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"model spec {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _hf_model(path_text: str, meta: bool):
    path = Path(path_text)
    # reason: checked before transformers is imported: importing it can print other libraries' warnings (torchao's
    # registrations under torch 2.14), and a mistyped path's error is one line
    if not path.exists():
        raise CLIError(f"hf:{path_text}: no such folder or file")
    try:
        transformers = require("transformers", "hf", "hf: models")
    except ImportError as error:
        raise CLIError(str(error)) from None
    folder = path if path.is_dir() else path.parent
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"hf:{path_text}: cannot read a transformers config ({error})") from None
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    has_weights = path.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")))
    if has_weights and not meta:  # on the meta device only the architecture is wanted: no weights are read
        logging = transformers.utils.logging
        shown = logging.is_progress_bar_enabled()
        if not draws():  # transformers' loading bar, like rpq-fx's own, only on a terminal
            logging.disable_progress_bar()
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        finally:
            if shown:
                logging.enable_progress_bar()
    return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def build_model(spec: str, *, meta: bool = False):
    """The ``nn.Module`` a SPEC names (see ``SPEC_HELP``); on the meta device if ``meta``."""
    import torch
    from torch import nn

    with torch.device("meta") if meta else _nothing():
        kind, _, rest = spec.partition(":")
        if kind == "timm":
            try:
                timm = require("timm", "timm", "timm: models")
            except ImportError as error:
                raise CLIError(str(error)) from None
            if not rest:
                raise CLIError("timm: needs a model name, e.g. timm:resnet18")
            try:
                model = timm.create_model(rest, pretrained=False)
            except RuntimeError as error:
                raise CLIError(f"timm:{rest}: {error}") from None
        elif kind == "hf":
            model = _hf_model(rest, meta)
        else:
            try:
                factory = _factory(spec)
                model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
            except SystemExit as stop:
                # reason: sys.exit inside the user's code would end rpq-fx with its status, 0 included,
                # having written nothing
                raise CLIError(f"model spec {spec!r} called sys.exit({stop.code!r}) instead of returning "
                               "a model") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"model spec {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextmanager
def _nothing():
    yield


# ---------------------------------------------------------------------------------------------------
# commands


def _progress(total: int, quiet: bool, desc: str):
    desc = desc if len(desc) <= 40 else f"...{desc[-37:]}"  # reason: a long path would leave no room for the bar
    return progress_bar(total=total, desc=desc, unit="step", enabled=not quiet,
                        bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{postfix}")


def _convert_settings(args) -> dict:
    from . import RPQConfig

    settings = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CLIError(f"--config {args.config}: {error}") from None
        if not isinstance(values, dict):
            raise CLIError(f"--config {args.config}: must hold a JSON object of RPQConfig settings "
                           f"(RPQConfig.to_dict()), got a JSON {type(values).__name__}")
        try:
            settings["config"] = RPQConfig.from_dict(values)
        except (TypeError, ValueError) as error:
            raise CLIError(f"--config {args.config}: {error}") from None
        split_given = args.num_codebooks or args.codebook_dim or args.max_codebook_dim
        if (split_given or args.num_codes != 256 or args.shared_codebooks or args.checkpoint or args.seed
                or args.init != "random" or args.codebook_dtype or args.additive_codebooks != 1):
            raise CLIError("--config sets every setting: give the other conversion options in its JSON instead")
        return settings
    split = {"num_codebooks": args.num_codebooks, "codebook_dim": args.codebook_dim,
             "max_codebook_dim": args.max_codebook_dim}
    split = {k: v for k, v in split.items() if v is not None} or {"max_codebook_dim": RPQ_MAX_CODEBOOK_DIM}
    settings.update(split, num_codes=args.num_codes, shared_codebooks=args.shared_codebooks, init=args.init,
                    codebook_dtype=args.codebook_dtype, checkpoint=args.checkpoint, seed=args.seed,
                    additive_codebooks=args.additive_codebooks)
    return settings


_OUTPUTS = (CHECKPOINT, "report.md", "report.json", "code.py", "graph.txt", "graph.svg", "graph.dot", "graph.html",
            "index.md")
_PARTIAL = ".rpq-fx-partial-"


def _clean_partial(out: Path) -> None:
    """Remove the temporary folders that killed runs (their process gone) left in ``out``."""
    from .io import process_alive

    for folder in out.glob(f"{_PARTIAL}*"):
        pid = folder.name.removeprefix(_PARTIAL)
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _publish(work: Path, out: Path) -> None:
    """Move a finished run's outputs from ``work`` into ``out``: first every output of an earlier run
    is removed, then the new ones are moved in, the checkpoint last, so a folder never holds a
    checkpoint beside another run's report (a kill in between leaves no checkpoint)."""
    new = sorted(p.name for p in work.iterdir())
    for name in {*_OUTPUTS, *new}:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    for name in sorted(new, key=lambda n: n == CHECKPOINT):
        os.replace(work / name, out / name)


def _calibration_source(args) -> list | None:
    """The lines or image files ``--calibration`` names, read before the model is built (so a bad
    file fails fast); None without ``--calibration``."""
    from . import _cli_data

    if args.calibration is None:
        return None
    if args.spec.partition(":")[0] not in ("hf", "timm"):
        raise CLIError(f"--calibration reads text for hf: models and images for timm: models, not for {args.spec!r}: "
                       "call rpq_fx.convert(model, init='kmeans', calibration=...) from Python with your own inputs")
    if args.calibration_samples < 1:
        raise CLIError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    path = Path(args.calibration)
    try:
        if args.spec.startswith("hf:"):
            return _cli_data.read_lines(path, args.calibration_samples)
        return _cli_data.image_files(path, args.calibration_samples)
    except _cli_data.CalibrationDataError as error:
        raise CLIError(str(error)) from None


def _calibration(args, source: list | None, model) -> list | None:
    """The batches of ``source`` (see ``_calibration_source``) as ``model`` takes them."""
    from . import _cli_data

    if source is None:
        return None
    try:
        if args.spec.startswith("hf:"):
            rest = Path(args.spec.partition(":")[2])
            return _cli_data.text_batches(Path(args.calibration), source, rest if rest.is_dir() else rest.parent,
                                          model)
        return _cli_data.image_batches(source, model)
    except _cli_data.CalibrationDataError as error:
        raise CLIError(str(error)) from None


def _check_init(args, settings: dict) -> None:
    init = settings["config"].init if "config" in settings else settings["init"]
    if args.calibration is not None and init != "kmeans":
        raise CLIError(f"--calibration makes the k-means fit data-aware: add --init kmeans (the init is {init!r})")


def _check_converted(rep) -> None:
    """Fail when no weight was converted (a checkpoint identical to the dense model is never what was
    asked for); warn on stderr when some stayed dense."""
    totals, rows = rep.to_dict()["totals"], rep.to_dict()["rows"]
    dense = [r for r in rows if r["C"] is None]
    if not totals["layers"]:
        raise CLIError("the model has no linear / conv / embedding weight to convert, so nothing was written")
    if totals["converted"] == 0:
        why = "; ".join(f"{r['layer']}: {r['note']}" for r in dense[:3])
        more = f"; and {len(dense) - 3} more" if len(dense) > 3 else ""
        hint = ("; --max-codebook-dim (the default) picks a split that divides each row"
                if any("not divisible" in (r["note"] or "") for r in dense) else "")
        raise CLIError(f"converted 0 of {totals['layers']} weights, so nothing was written ({why}{more}){hint}")
    if dense:
        note(f"rpq-fx: warning: {len(dense)} of {totals['layers']} weights stay dense (report.md says why)")


def _cmd_convert(args) -> int:
    import rpq_fx

    settings = _convert_settings(args)
    _check_init(args, settings)
    source = _calibration_source(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_partial(out)
    work = out / f"{_PARTIAL}{os.getpid()}"
    steps = ["build", "convert", "save", "report"] + ([] if args.no_graph else ["graph"])
    try:
        with _progress(len(steps), args.quiet, f"rpq-fx convert {args.spec}") as bar:
            bar.set_postfix_str("building the model")
            model = build_model(args.spec)
            if args.eval:
                model.eval()
            calibration = _calibration(args, source, model)
            bar.update()
            bar.set_postfix_str("converting")
            gm = rpq_fx.convert(model, strict=args.strict, calibration=calibration, progress=not args.quiet,
                                **settings)
            rep = rpq_fx.report(gm)
            _check_converted(rep)
            bar.update()
            bar.set_postfix_str("saving")
            rpq_fx.save(gm, work / CHECKPOINT, spec=args.spec)
            bar.update()
            bar.set_postfix_str("report")
            (work / "report.md").write_text(rep.to_markdown() + "\n")
            (work / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
            bar.update()
            if not args.no_graph:
                bar.set_postfix_str("graph")
                rpq_fx.export_graph(gm, work)
                bar.update()
            bar.set_postfix_str("done")
        _publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checkpoint = out / CHECKPOINT
    if not args.quiet:
        print(rep)
    size = checkpoint.stat().st_size
    print(f"wrote {checkpoint} ({size / 2**20:.3f} MiB; model {rpq_fx.model_size(gm):.3f} MiB) and the report"
          f"{'' if args.no_graph else ' and graph export'} to {out}/")
    return 0


def _header(info: dict, path: Path) -> str:
    arch = info["architecture"]
    return "\n".join([
        f"file:          {path} ({info['file_bytes']} bytes, {len(info['tensors'])} tensors)",
        f"format:        rpq_fx checkpoint v{info['format_version']}, written by rpq_fx {info.get('rpq_fx_version')} "
        f"/ torch {info.get('torch_version')}",
        f"model:         {arch['class']} ({len(arch['tensors'])} original tensors, fingerprint {arch['fingerprint'][:16]})",
        f"built from:    {info.get('spec') or '(not recorded)'}",
        f"config:        {json.dumps(info['config'], sort_keys=True)}",
    ])


def _cmd_report(args) -> int:
    from .io import checkpoint_info, checkpoint_report

    path = Path(args.file)
    info = checkpoint_info(path)
    rep = checkpoint_report(path)
    if args.json:
        print(json.dumps({"file": str(path), "config": info["config"], "spec": info.get("spec"),
                          **rep.to_dict()}, indent=2))
    else:
        print(_header(info, path) + "\n")
        print(rep.to_markdown() if args.markdown else rep)
    return 0


def _file_name(text: str) -> str:
    """``text`` (a key from a checkpoint's metadata) as one harmless file name: no separator, no
    leading dot, nothing but letters, digits, ``_ . -``, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:100].lstrip(".") or "_"


def _cmd_inspect(args) -> int:
    import rpq_fx

    from .io import checkpoint_info, checkpoint_report

    path, out = Path(args.file), Path(args.out)
    info = checkpoint_info(path)
    spec = args.model  # reason: only a spec the user typed is built; the file's is text from a stranger
    out.mkdir(parents=True, exist_ok=True)
    steps = 3 if spec else 1
    with _progress(steps, args.quiet, f"rpq-fx inspect {path.name}") as bar:
        bar.set_postfix_str("metadata")
        meta = {k: v for k, v in info.items() if k not in ("code", "sha256")}
        (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        rows = [f"{name}\t{e['dtype']}\t{'x'.join(map(str, e['shape'])) or 'scalar'}\t{e['bytes']}"
                for name, e in info["tensors"].items()]
        (out / "tensors.tsv").write_text("name\tdtype\tshape\tbytes\n" + "\n".join(rows) + "\n")
        bar.update()
        if spec:
            bar.set_postfix_str(f"building {spec} on meta")
            model = build_model(spec, meta=True)
            modes = {key.rpartition(":")[2] for key in info["code"]}
            model.train("train" in modes and "eval" not in modes)  # the graph export shows the saved mode
            bar.update()
            bar.set_postfix_str("loading and exporting the graph")
            gm = rpq_fx.load(model, path)
            rpq_fx.export_graph(gm, out)
            bar.update()
        else:
            rep = checkpoint_report(path)
            (out / "report.md").write_text(rep.to_markdown() + "\n")
            (out / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
            names = {mode: "code.py" if len(info["code"]) == 1 else f"code_{_file_name(mode)}.py"
                     for mode in info["code"]}
            if len(set(names.values())) < len(names):
                names = {mode: f"code_{i}.py" for i, mode in enumerate(info["code"])}
            for mode, code in info["code"].items():
                (out / names[mode]).write_text(code)
    written = sorted(p.name for p in out.iterdir())
    print(f"{path}: wrote {', '.join(written)} to {out}/")
    if not spec:
        recorded = info.get("spec")
        hint = (f"the file says it was built from {recorded!r}: if you trust that code, pass --model {recorded} to "
                "rebuild it and draw graph.svg" if recorded else
                "no model spec recorded in the file: pass --model SPEC to rebuild it and draw graph.svg")
        print(hint)
    return 0


# ---------------------------------------------------------------------------------------------------
# the parser


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="rpq-fx", formatter_class=formatter,
        description="Store every Linear / Conv / Embedding weight of a model as RPQ codebooks + uint8 codes, "
                    "and work with the saved checkpoints.",
        epilog="commands:\n  convert   build a model from a SPEC, convert it, save checkpoint + report + graph\n"
               "  report    print the size report of a saved checkpoint (no model needed)\n"
               "  inspect   write a checkpoint's metadata, tensors, report, code and graph to a folder\n\n"
               "`rpq-fx COMMAND --help` describes each. Exit status: 0 ok, 1 error (one line on stderr), "
               "2 bad command line.")
    parser.add_argument("--version", action="version", version=f"rpq-fx {__version__}")
    parser.add_argument("--traceback", action="store_true", help="on error, show the full Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = sub.add_parser(
        "convert", formatter_class=formatter, help="convert a model and save it",
        description="Build the model SPEC names, convert its weights to RPQ and write to --out: "
                    f"{CHECKPOINT} (rpq_fx.save), report.md / report.json, and the graph export "
                    "(code.py, graph.txt, graph.svg or graph.dot, and graph.html: the module tree beside the "
                    "zoomable picture, one self-contained page).",
        epilog=SPEC_HELP + "\nThe split: at most one of --num-codebooks, --codebook-dim, --max-codebook-dim "
                           f"(default: --max-codebook-dim {RPQ_MAX_CODEBOOK_DIM}, as rpq_fx.RPQ).\n\nexample:\n"
                           "  rpq-fx convert timm:resnet18 --num-codebooks 8 --out out/resnet18")
    convert.add_argument("spec", metavar="SPEC", help="the model: timm:NAME, hf:PATH or MODULE:FACTORY (below)")
    convert.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if missing)")
    split = convert.add_mutually_exclusive_group()
    split.add_argument("--num-codebooks", type=int, metavar="C", help="codebooks per weight row (C)")
    split.add_argument("--codebook-dim", type=int, metavar="D", help="values per codeword (d); C = row length / d")
    split.add_argument("--max-codebook-dim", type=int, metavar="D",
                       help="per layer, the largest d <= D that divides the row")
    convert.add_argument("--num-codes", type=int, default=256, metavar="K",
                         help="codewords per codebook (default: %(default)s; above 256 the codes are int16)")
    convert.add_argument("--shared-codebooks", action="store_true", help="one codebook shared by all slices of a row")
    convert.add_argument("--additive-codebooks", type=int, default=1, metavar="M",
                         help="M codes per slice, their codewords summed (additive quantization, AQLM's; each stage "
                              "stores its own codebooks and codes); with --init kmeans the M codes are searched "
                              "jointly (default: %(default)s)")
    convert.add_argument("--init", choices=["random", "kmeans"], default="random",
                         help="random: the RPQ default (train from scratch); kmeans: fit codebooks and codes to "
                              "the model's weights by k-means (default: %(default)s)")
    convert.add_argument("--codebook-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                         help="store the codebooks in this dtype (default: the weight's own)")
    convert.add_argument("--checkpoint", action="store_true",
                         help="recompute each expanded weight in backward instead of keeping it")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random init (default: %(default)s)")
    convert.add_argument("--calibration", metavar="FILE",
                         help="with --init kmeans, fit each layer to its outputs on this data: for hf: models a "
                              "UTF-8 text file, one example per line (the model's own tokenizer, saved in its "
                              "folder); for timm: models a folder of images (timm's preprocessing for the model)")
    convert.add_argument("--calibration-samples", type=int, default=64, metavar="N",
                         help="use at most N lines or images of --calibration (default: %(default)s)")
    convert.add_argument("--config", metavar="JSON",
                         help="an RPQConfig as a JSON file (RPQConfig.to_dict()), instead of the options above")
    convert.add_argument("--strict", action="store_true", help="fail if any weight-bearing layer cannot be converted")
    convert.add_argument("--eval", action="store_true", help="convert the model in eval mode (default: as built)")
    convert.add_argument("--no-graph", action="store_true", help="skip the graph export (large models draw slowly)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar and no report on stdout")
    convert.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="on error, show the full Python traceback")
    convert.set_defaults(run=_cmd_convert)

    report = sub.add_parser(
        "report", formatter_class=formatter, help="print a checkpoint's size report",
        description="Print what a checkpoint written by `rpq-fx convert` or rpq_fx.save holds: versions, "
                    "config, and the per-layer report (C, K, d, bytes before and after, why a layer stayed "
                    "dense). Reads only the file's metadata.", epilog=CHECKSUM_HELP)
    report.add_argument("file", metavar="FILE", help="the .safetensors checkpoint")
    fmt = report.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="the table as Markdown")
    fmt.add_argument("--json", action="store_true", help="config and report as JSON")
    report.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="on error, show the full Python traceback")
    report.set_defaults(run=_cmd_report)

    insp = sub.add_parser(
        "inspect", formatter_class=formatter, help="write a checkpoint's contents out for reading",
        description="Write to --out: metadata.json (config, conversion record, architecture), tensors.tsv "
                    "(every stored tensor), report.md / report.json, and the generated code. With --model SPEC "
                    "(the original architecture: rpq-fx convert records it in the file, and inspect prints it, "
                    "but never builds it: that would run code the file names), the model is built on the meta "
                    "device, the checkpoint loaded into it (rpq_fx.load, every check made) and the full graph "
                    "export written: code.py, graph.txt, graph.svg.", epilog=SPEC_HELP + "\n" + CHECKSUM_HELP)
    insp.add_argument("file", metavar="FILE", help="the .safetensors checkpoint")
    insp.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if missing)")
    insp.add_argument("--model", metavar="SPEC", help="the original architecture to build (runs that code): see below")
    insp.add_argument("--quiet", action="store_true", help="no progress bar")
    insp.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                      help="on error, show the full Python traceback")
    insp.set_defaults(run=_cmd_inspect)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return status
    except BrokenPipeError:
        # reason: `rpq-fx report x | head` closes the pipe early; Unix tools end silently then. Python's
        # recipe (docs, signal module): point stdout at devnull so the flush at exit cannot fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor has nothing left to flush
            pass
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        print("rpq-fx: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (every failure ends as one line, unless --traceback)
        if args.traceback:
            raise
        from .errors import RPQConversionError
        from .io import RPQCheckpointError

        known = (CLIError, RPQConversionError, RPQCheckpointError, FileNotFoundError, ValueError, TypeError,
                 ImportError, OSError)
        prefix = "" if isinstance(error, known) else f"{type(error).__name__}: "
        print(f"rpq-fx: error: {prefix}{_one_line(error)}", file=sys.stderr)
        return 1


def _entry() -> None:
    sys.exit(main())
