"""The command line: ``python -m erasure_core {inspect,fit,eval,demo}``.

* ``inspect PATCH [--json]``: metadata, tensors, sizes, model family of a patch file;
* ``fit --method {clear,pure,hirm,erasepro} ...``: fit on a local transformers encoder;
* ``eval PATCH --encoder DIR``: leakage / retain numbers of a patch on an encoder;
* ``demo``: every method on an embedded default, with a before/after table.

Errors in user input or files print one line (``error: ...``) and exit with code 2;
no traceback. ``-v`` shows library logging.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_args import add_concept_arguments
from .errors import ErasureError

log = logging.getLogger("erasure_core")

#: method -> module providing ``add_arguments(parser)`` and ``run(args) -> ErasurePatch``
FIT_METHODS = {
    "clear": "erasure_core.clear.cli",
    "pure": "erasure_core.pure.cli",
    "hirm": "erasure_core.hirm.cli",
    "erasepro": "erasure_core.erasepro.cli",
}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .patch_file import ErasurePatch

    path = Path(args.patch)
    patch = ErasurePatch.load(path)
    info = patch.summary()
    info["file"] = str(path)
    info["file_size"] = path.stat().st_size
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    out = [
        f"{path.name}: {info['method']} patch for {info['model_family']} ({_human(info['file_size'])}, "
        f"{info['num_parameters']:,} parameters, pack {info['pack_version']})",
        f"  targets: {', '.join(info['concept'].get('targets', [])) or '-'}; "
        f"anchor: {info['concept'].get('anchor') or '(nothing)'}",
    ]
    if info["metrics"]:
        out.append(
            "  metrics: " + ", ".join(f"{k}={v}" for k, v in info["metrics"].items() if not isinstance(v, (dict, list)))
        )
    for d in info["deltas"]:
        off = f" rows {d['offset'][1]}:{d['offset'][1] + d['offset'][2]}" if d["offset"] else ""
        out.append(f"  {d['target']:5s} {d['kind']:7s} rank {d['rank']:4d} {tuple(d['shape'])} {d['key']}{off}")
    for c in info["clear_modules"]:
        out.append(
            f"  CLEAR {c['encoder']} block {c['block']} ({c['block_path']}): {c['features']} features, "
            f"{c['specific_features']} specific, default strength {c['default_strength']}"
        )
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _fit_module(method: str):
    if method not in FIT_METHODS:
        raise ErasureError(f"unknown method {method!r}; choose one of {', '.join(FIT_METHODS)}")
    try:
        return importlib.import_module(FIT_METHODS[method])
    except ModuleNotFoundError:
        raise ErasureError(f"the {method} method is not available in this version of the pack") from None


def cmd_fit(args: argparse.Namespace, rest: Sequence[str]) -> int:
    module = _fit_module(args.method)
    p = argparse.ArgumentParser(prog=f"python -m erasure_core fit --method {args.method}")
    add_concept_arguments(p)
    module.add_arguments(p)
    fit_args = p.parse_args(list(rest))
    if Path(fit_args.out).exists() and not fit_args.overwrite:
        raise ErasureError(f"{fit_args.out} exists; choose another --out or pass --overwrite")
    patch = module.run(fit_args)
    path = patch.save(fit_args.out, overwrite=fit_args.overwrite)
    sys.stdout.write(f"wrote {path} ({_human(path.stat().st_size)})\n")
    for k, v in patch.metrics.items():
        if not isinstance(v, (dict, list)):
            sys.stdout.write(f"  {k}: {v}\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .adapters.hf import HFTextEncoder
    from .evaluate import evaluate_encoder_patch
    from .patch_file import ErasurePatch

    patch = ErasurePatch.load(args.patch)
    encoder = HFTextEncoder.from_pretrained(args.encoder, device=args.device)
    report = evaluate_encoder_patch(patch, encoder, strength=args.strength)
    for k, v in report.as_dict().items():
        sys.stdout.write(f"{k:22s} {v:.4f}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=Path(args.out_dir), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erasure_core", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="show library logging")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="describe a patch file")
    q.add_argument("patch")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = sub.add_parser("fit", help="fit an eraser on a local transformers encoder", add_help=False)
    q.add_argument("--method", required=True, choices=sorted(FIT_METHODS))
    q = sub.add_parser("eval", help="leakage and retain numbers of a patch on an encoder")
    q.add_argument("patch")
    q.add_argument("--encoder", required=True, help="local transformers encoder directory")
    q.add_argument("--strength", type=float, default=1.0)
    q.add_argument("--device", default="cpu")
    q = sub.add_parser("demo", help="fit every method on an embedded default and print a before/after table")
    q.add_argument("--out-dir", default="erasure_demo", help="where the demo writes its patch files")
    q.add_argument("--quick", action="store_true", help="fewer steps (for smoke tests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "fit":
            return cmd_fit(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"inspect": cmd_inspect, "eval": cmd_eval, "demo": cmd_demo}[args.command](args)
    except (ErasureError, FileExistsError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        done = "nothing was written" if args.command == "fit" else "files already written are kept"
        sys.stderr.write(f"interrupted; {done}\n")
        return 130
