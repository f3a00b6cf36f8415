"""Cache directory and build-once-across-processes for derived data (corpus, tokenizer, block caches)."""

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "MPNET_DIST_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/mpnet_dist"


def cache_root(data_cache_dir: str | None = None) -> Path:
    """`--data-cache-dir`, else $MPNET_DIST_CACHE, else ~/.cache/mpnet_dist."""
    root = data_cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            # Some network filesystems refuse flock; the atomic rename below still keeps the
            # result whole, at worst two processes build the same thing.
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make directory `target` with `build(tmp_dir)` unless it exists; safe under concurrent callers.

    Every rank calls this: one builds into a temporary sibling and renames it into place, the
    others block on the lock and then find the finished directory. A directory that exists is
    complete, because it only ever appears by rename.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # lost a race without a working lock: theirs is as good
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
