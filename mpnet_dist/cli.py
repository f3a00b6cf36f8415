"""`mpnet-dist` console script: a table of subcommands, each dispatching to its module's main(argv)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line description)
COMMANDS = {
    "train": ("mpnet_dist.train", "main", "pretrain MPNet (same flags as annotated-mpnet's pretrain-mpnet)"),
    "export": (
        "mpnet_dist.export.cli",
        "main",
        "write a verified Hugging Face MPNetForMaskedLM folder from a checkpoint",
    ),
    "tokenizer": (
        "mpnet_dist.data",
        "tokenizer_main",
        "train a WordPiece tokenizer (MPNet special-token layout)",
    ),
}


def usage() -> str:
    lines = ["usage: mpnet-dist COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += [
        "",
        "Multi-process: accelerate launch [--config_file launch_configs/...] -m mpnet_dist.train ARGS",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mpnet-dist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module, func, _ = COMMANDS[name]
    code = getattr(importlib.import_module(module), func)(rest)
    sys.exit(code or 0)
