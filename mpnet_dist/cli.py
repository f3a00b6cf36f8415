"""`mpnet-dist` console script: a table of subcommands, each dispatching to its module's main(argv)."""

from __future__ import annotations

import importlib
import sys

from mpnet_dist import __version__
from mpnet_dist.command import EXIT_USER_ERROR, report_error

# subcommand -> (module, function, one-line description)
COMMANDS = {
    "train": ("mpnet_dist.train", "main", "pretrain MPNet in one process (same flags as annotated-mpnet)"),
    "launch": (
        "mpnet_dist.launch",
        "main",
        "accelerate launch with clean exits: several processes, DeepSpeed, several nodes",
    ),
    "export": (
        "mpnet_dist.export.cli",
        "main",
        "write a verified Hugging Face MPNetForMaskedLM folder from a checkpoint",
    ),
    "eval": ("mpnet_dist.evaluation", "main", "masked-LM loss, accuracy and perplexity on held-out text"),
    "fill-mask": ("mpnet_dist.fill_mask", "main", "top predictions for each <mask> in a text"),
    "plot": ("mpnet_dist.plot", "main", "draw training curves (loss vs unigram, accuracy, lr...) of runs"),
    "tokenizer": (
        "mpnet_dist.data",
        "tokenizer_main",
        "train a WordPiece tokenizer (MPNet special-token layout)",
    ),
    "network": (
        "mpnet_dist.network",
        "main",
        "which network interface reaches the head node (run on each node before a multi-node launch)",
    ),
}


def usage() -> str:
    lines = ["usage: mpnet-dist [--version] COMMAND [ARGS]   (mpnet-dist COMMAND --help for its flags)", ""]
    lines += ["commands:"] + [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        sys.exit(0)
    if argv[:1] in (["-V"], ["--version"]):
        print(f"mpnet-dist {__version__}")
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        report_error("mpnet-dist", f"{what}; the commands are {', '.join(COMMANDS)} (mpnet-dist --help)")
        sys.exit(EXIT_USER_ERROR)
    module, func, _ = COMMANDS[argv[0]]
    code = getattr(importlib.import_module(module), func)(argv[1:])
    sys.exit(code or 0)
