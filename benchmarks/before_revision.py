"""The `before` variants of benchmarks/train_throughput.py: the model, loss and step code of another git revision."""

from __future__ import annotations

import functools
import importlib
import inspect
import subprocess
import sys
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def load(rev: str) -> dict[str, object]:
    """The model, loss and step modules of `rev`, importable side by side with the working tree's."""
    root = Path(tempfile.mkdtemp(prefix="mpnet_before_")) / "mpnet_before"
    (root / "model").mkdir(parents=True)
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "mpnet_dist/model/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    files = {
        f"model/{Path(n).name}": n for n in listing if n.endswith(".py") and not n.endswith("__init__.py")
    }
    files.update({"loss.py": "mpnet_dist/loss.py", "step.py": "mpnet_dist/step.py"})
    for target, source in files.items():
        text = subprocess.run(
            ["git", "show", f"{rev}:{source}"], check=True, capture_output=True, text=True
        ).stdout
        (root / target).write_text(text.replace("from mpnet_dist.loss", "from mpnet_before.loss"))
    (root / "__init__.py").write_text("")
    (root / "model" / "__init__.py").write_text("")
    sys.path.insert(0, str(root.parent))
    names = {"config": "model.config", "attention": "model.attention", "mpnet": "model.mpnet"}
    names.update({"loss": "loss", "step": "step"})
    return {key: importlib.import_module(f"mpnet_before.{name}") for key, name in names.items()}


def full_last_layer(rev: str) -> bool:
    """Whether `rev`'s last layer computes every row (revisions before the query-only last layer)."""
    return "output_from" not in inspect.getsource(load(rev)["mpnet"])
