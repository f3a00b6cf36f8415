"""Data pipeline throughput per worker process: tokenize + pack, and block cache -> MPNet batch.

    OMP_NUM_THREADS=1 python -m benchmarks.data_pipeline [--max-tokens 512] [--batch-size 16]   # repo root

Corpus and tokenizer: the built-in ones (stdlib docstrings, 8192-token WordPiece), built in a
temporary cache. The Rust tokenizer runs single-threaded (RAYON_NUM_THREADS=1) so every figure is
one process. Rows, in tokens/s of model input (no padding in packed blocks):
  tokenize+pack   documents -> block cache on disk (ids + word starts), what rank 0 does once
  baseline        the reference trainer's path: tokenizer(docs, truncation=True) (tails dropped)
  cache->batch    RankBatches: seeded order, memmap gather, make_mpnet_batch (Cython / NumPy)
  1 worker        the same through a DataLoader worker, timed in the training process
  stream          HF streaming of the corpus as JSON lines (one file, so one shard): read, shuffle, tokenize,
                  pack, batch; with 1 logical stream (--data-streams 1), with 12 (the default on 1 process: each
                  stream reads the whole file and keeps 1 document in 12), and 12 over 4 files (whole shards)
"""

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402
from mpnet_dist.data import (  # noqa: E402
    build_data,
    load_tokenizer,
    permutation,  # noqa: E402
)
from mpnet_dist.data.corpus import materialize_builtin_corpus  # noqa: E402
from mpnet_dist.data.packing import BlockLayout, build_block_cache  # noqa: E402
from mpnet_dist.data.sources import list_train_files, read_documents  # noqa: E402
from mpnet_dist.data.tokenizer import Encoder, fingerprint  # noqa: E402


def config(cache: str, args: argparse.Namespace, **kw) -> argparse.Namespace:
    base = dict(
        train_dir=None, valid_file=None, test_file=None, dataset_name="builtin", dataset_config=None,
        dataset_split="train", text_field="text", buffer_size=1000, data_streams=None, eval_samples=0,
        min_text_length=1,
        max_tokens=args.max_tokens, batch_size=args.batch_size, update_freq=1, num_workers=0, seed=1,
        packing=True, pred_prob=0.15, rand_prob=0.1, keep_prob=0.1, whole_word_mask=True, data_cache_dir=cache,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def rate(batches, n: int, tokens_per_batch: int) -> float:
    next(batches)  # warm-up (worker start, first memmap pages)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * tokens_per_batch / (time.perf_counter() - start)


def tokenize_rates(tokenizer, cache: Path, files: list[Path], max_tokens: int) -> tuple[float, float]:
    docs = [d for f in files for d in read_documents(f)]
    start = time.perf_counter()
    layout = BlockLayout(fingerprint(tokenizer), len(tokenizer), max_tokens, True, "text")
    blocks = build_block_cache(files, Encoder(tokenizer), layout, cache / "bench")
    ours = blocks.n_tokens / (time.perf_counter() - start)
    start, kept = time.perf_counter(), 0
    for i in range(0, len(docs), 512):
        kept += sum(map(len, tokenizer(docs[i : i + 512], truncation=True, max_length=max_tokens).input_ids))
    return ours, kept / (time.perf_counter() - start)


def write_jsonl(files: list[Path], out: Path, parts: int = 1) -> Path:
    """The corpus as `parts` JSON-lines files (document i in file i mod parts)."""
    out.mkdir()
    handles = [open(out / f"corpus{i:02d}.jsonl", "w") for i in range(parts)]  # noqa: SIM115
    for i, doc in enumerate(d for p in files for d in read_documents(p)):
        handles[i % parts].write(json.dumps({"text": doc}) + "\n")
    for handle in handles:
        handle.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per end-to-end row")
    args = parser.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, Cython extension: {permutation.HAS_EXTENSION}"
    )
    per_batch = args.batch_size * args.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer("builtin", tmp)
        files = list_train_files(materialize_builtin_corpus(tmp).train_dir)
        ours, baseline = tokenize_rates(tokenizer, Path(tmp), files, args.max_tokens)
        rows = [("tokenize+pack (ours)", ours), ("baseline: tokenizer(truncation=True)", baseline)]
        data = build_data(config(tmp, args), tokenizer, 0, 1)
        print(f"data: {data.source_info}; B={args.batch_size}, L={args.max_tokens}\n")
        rows.append(("cache->batch, Cython", rate(data.train, args.batches, per_batch)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            permutation.HAS_EXTENSION, saved = False, permutation.HAS_EXTENSION
            rows.append(("cache->batch, NumPy builder", rate(data.train, args.batches, per_batch)))
            permutation.HAS_EXTENSION = saved
        worker = build_data(config(tmp, args, num_workers=1), tokenizer, 0, 1)
        rows.append(("cache->batch, 1 DataLoader worker", rate(worker.train, args.batches, per_batch)))
        stream_dir = write_jsonl(files, Path(tmp) / "jsonl")
        for label, folder, streams in (
            ("stream, 1 file, 1 logical stream", stream_dir, 1),
            ("stream, 1 file, 12 logical streams (default)", stream_dir, None),
            (
                "stream, 12 files, 12 logical streams (default)",
                write_jsonl(files, Path(tmp) / "jsonl12", 12),
                None,
            ),
        ):
            stream = build_data(
                config(tmp, args, dataset_name=str(folder), data_streams=streams), tokenizer, 0, 1
            )
            rows.append((label, rate(stream.train, args.batches, per_batch)))
    print("| stage (one process) | tokens/s |")
    print("|---|---:|")
    for label, value in rows:
        print(f"| {label} | {value:,.0f} |")


if __name__ == "__main__":
    main()
