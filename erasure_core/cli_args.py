"""Command-line pieces every ``fit --method ...`` shares: the concept options, block lists, the request."""

from __future__ import annotations

import argparse

from .prompts import ConceptRequest


def add_concept_arguments(p: argparse.ArgumentParser) -> None:
    """The options every fit shares: the encoder, the concept request, the output, progress."""
    p.add_argument("--encoder", required=True, help="local transformers encoder directory (CLIP, T5/UMT5, BERT)")
    p.add_argument("--target", action="append", required=True, help="concept to erase (repeat for several)")
    p.add_argument("--anchor", default="", help="what the target should become (default: nothing)")
    p.add_argument("--retain", action="append", default=None, help="concept that must not change (repeatable)")
    p.add_argument("--preset", default="object", choices=["object", "style", "celebrity", "nudity"])
    p.add_argument("--prompt", action="append", default=None, help="extra prompt containing the target")
    p.add_argument("--paraphrase", action="append", default=None, help="prompt evoking the target without naming it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def request_from_args(args: argparse.Namespace) -> ConceptRequest:
    """The validated concept request of the shared options (raises ``ConceptRequestError``)."""
    return ConceptRequest.create(
        args.target,
        anchor=args.anchor,
        retain=args.retain,
        preset=args.preset,
        prompts=args.prompt,
        paraphrases=args.paraphrase,
    )


def parse_blocks(text: str, *, allow_all: bool = False) -> tuple[int, ...] | None:
    """``"3"``, ``"2,5,7"`` or ``"4-9"`` -> block indices; with ``allow_all``, ``"all"`` -> None, ``"none"`` -> ()."""
    word = text.strip().lower()
    if allow_all and word == "all":
        return None
    if allow_all and word == "none":
        return ()
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        words = "'all', 'none', " if allow_all else ""
        raise argparse.ArgumentTypeError(f"--blocks expects {words}'3', '2,5,7' or '4-9', got {text!r}") from None
    return tuple(out)
