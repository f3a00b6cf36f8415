"""`mpnet-dist eval PATH --text-file F`: masked-LM loss, accuracy and perplexity on held-out text.

The text is packed as in training (documents joined as `<s> ... </s>`, cut into blocks of --max-tokens) and
15% of the ordinary tokens of every block are predicted, chosen and corrupted (80% <mask>, 10% a random
ordinary token, 10% unchanged, as BERT and Hugging Face's MLM collator) by a generator seeded with (--seed,
block index): the same text and seed give the same masks for every model, so runs compare with each other
and with models from elsewhere. Checkpoints also report the two-stream (MPNet pretraining) objective on the
same blocks, with the training batch builder. One JSON line goes to stdout, a readable summary to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpnet_dist.inference import LoadedModel, ModelPathError, block_length, load_model

PRED_PROB, MASK_PROB, RANDOM_PROB = 0.15, 0.8, 0.1
_EVAL_TAG = 4  # seed stream of the two-stream eval batches (training uses 1-3 for train/valid/test)


def read_blocks(
    text_file: Path, tokenizer: Any, max_tokens: int, max_docs: int | None, text_field: str
) -> Any:
    from mpnet_dist.data.packing import pack_documents
    from mpnet_dist.data.sources import read_documents
    from mpnet_dist.data.tokenizer import Encoder

    docs = [d for d in islice(read_documents(text_file, text_field), max_docs) if d and d.strip()]
    if not docs:
        raise ModelPathError(
            f"--text-file {text_file}: no documents (one per line, or JSON lines with --text-field)"
        )
    blocks = pack_documents(docs, Encoder(tokenizer), max_tokens, packing=True)
    blocks.meta = {"n_docs": len(docs)}
    return blocks


def mlm_batch(tokens: np.ndarray, rows: np.ndarray, seed: int, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, L] -> (corrupted input ids [B, L], labels [B, L] with -100 where nothing is predicted)."""
    from mpnet_dist.data.batch import IGNORE_INDEX, replacement_ids

    choices = replacement_ids(spec.vocab_size, spec.excluded_ids)
    inputs, labels = tokens.copy(), np.full_like(tokens, IGNORE_INDEX)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, int(row)])
        candidates = np.flatnonzero(~np.isin(tokens[i], spec.excluded_ids))
        if candidates.size == 0:
            continue
        chosen = rng.choice(candidates, size=max(1, round(PRED_PROB * candidates.size)), replace=False)
        labels[i, chosen] = tokens[i, chosen]
        draw = rng.random(chosen.size)
        inputs[i, chosen[draw < MASK_PROB]] = spec.mask_id
        swap = chosen[(draw >= MASK_PROB) & (draw < MASK_PROB + RANDOM_PROB)]
        inputs[i, swap] = choices[rng.integers(0, choices.size, swap.size)]
    return inputs, labels


@torch.no_grad()
def evaluate_text(loaded: LoadedModel, blocks: Any, seed: int, batch_size: int = 16) -> dict[str, Any]:
    from mpnet_dist.data.pipeline import masking_spec
    from mpnet_dist.loss import prediction_loss

    tokenizer = loaded.tokenizer
    spec = masking_spec(_masking_flags(loaded), tokenizer)
    sums = {"mlm": np.zeros(3), "two_stream": np.zeros(3)}  # loss, correct, predicted
    for start in range(0, blocks.n_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, blocks.n_rows))
        tokens, starts = blocks.gather(rows, spec.pad_id, wrap=False)  # [B, L]; the last block padded
        inputs, labels = mlm_batch(tokens, rows, seed, spec)
        attention = torch.from_numpy(tokens != spec.pad_id).long()
        logits = loaded.mlm_logits(torch.from_numpy(inputs), attention)  # [B, L, V]
        loss, correct = prediction_loss(logits, torch.from_numpy(labels))
        sums["mlm"] += [loss.item(), correct.item(), int((labels != -100).sum())]
        if loaded.pretraining_model is not None:
            sums["two_stream"] += _two_stream(loaded.pretraining_model, tokens, starts, rows, seed, spec)
    result: dict[str, Any] = {"source": loaded.source, "kind": loaded.kind}
    result.update(_figures("", sums["mlm"]))
    if loaded.pretraining_model is not None:
        result.update(_figures("two_stream_", sums["two_stream"]))
    result.update(docs=blocks.meta["n_docs"], tokens=blocks.n_tokens, max_tokens=blocks.max_tokens, seed=seed)
    return result


def _two_stream(
    model: Any, tokens: np.ndarray, starts: np.ndarray, rows: np.ndarray, seed: int, spec: Any
) -> list:
    from mpnet_dist.data.batch import make_mpnet_batch
    from mpnet_dist.data.order import row_seeds
    from mpnet_dist.step import batch_loss

    batch = make_mpnet_batch(tokens, starts, row_seeds(seed, _EVAL_TAG, rows), spec)
    loss, correct = batch_loss(model, batch)
    return [loss.item(), correct.item(), int((batch["targets"] != -100).sum())]


def _masking_flags(loaded: LoadedModel) -> argparse.Namespace:
    """The run's 80/10/10 and whole-word settings for the two-stream batches (defaults for HF folders)."""
    cfg = loaded.train_config or {}
    return argparse.Namespace(
        pred_prob=cfg.get("pred_prob", PRED_PROB),
        rand_prob=cfg.get("rand_prob", RANDOM_PROB),
        keep_prob=cfg.get("keep_prob", 1 - MASK_PROB - RANDOM_PROB),
        whole_word_mask=cfg.get("whole_word_mask", True),
    )


def _figures(prefix: str, sums: np.ndarray) -> dict[str, float | int]:
    loss, correct, n = sums
    mean = loss / max(n, 1)
    return {
        f"{prefix}loss": mean,
        f"{prefix}acc": correct / max(n, 1),
        f"{prefix}perplexity": math.exp(min(mean, 700.0)),
        f"{prefix}predicted_tokens": int(n),
    }


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"{result['source']} ({result['kind']}) on {result['docs']} documents, {result['tokens']:,} tokens in blocks "
        f"of {result['max_tokens']}, seed {result['seed']}:",
        f"  masked LM   loss {result['loss']:.4f} nats | acc {result['acc']:.4f} | perplexity {result['perplexity']:.2f} "
        f"| {result['predicted_tokens']:,} predicted tokens",
    ]
    if "two_stream_loss" in result:
        lines.append(
            f"  two-stream  loss {result['two_stream_loss']:.4f} nats | acc {result['two_stream_acc']:.4f} | "
            f"perplexity {result['two_stream_perplexity']:.2f} | {result['two_stream_predicted_tokens']:,} predicted"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpnet-dist eval",
        description="Masked-LM loss (nats), accuracy and perplexity of a checkpoint (any kind) or a Hugging Face "
        "MPNet folder on held-out text, with a fixed seeded 15%% masking. JSON on stdout, summary on stderr.",
    )
    parser.add_argument(
        "path", type=Path, metavar="PATH", help="checkpoint folder, run directory, .pt file or HF folder"
    )
    parser.add_argument(
        "--text-file", type=Path, required=True, help="one document per line (.txt, .jsonl, .gz)"
    )
    parser.add_argument("--max-docs", type=int, default=None, help="score only the first N documents")
    parser.add_argument("--seed", type=int, default=0, help="masking seed (default 0)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="block length (default min(512, model's))"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per forward (default 16)")
    parser.add_argument("--text-field", default="text", help="JSON-lines field holding the text")
    parser.add_argument("--tokenizer-name", default=None, help="tokenizer (default: the model's own)")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled checkpoint files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mpnet_dist.checkpoint import CheckpointError
    from mpnet_dist.data import DataError

    try:
        if args.max_docs is not None and args.max_docs < 1:
            raise ModelPathError(f"--max-docs {args.max_docs}: must be >= 1")
        if not args.text_file.is_file():
            raise ModelPathError(f"--text-file {args.text_file}: no such file")
        loaded = load_model(args.path, trust=args.trust_checkpoint, tokenizer_name=args.tokenizer_name)
        blocks = read_blocks(
            args.text_file,
            loaded.tokenizer,
            block_length(loaded, args.max_tokens),
            args.max_docs,
            args.text_field,
        )
        result = evaluate_text(loaded, blocks, args.seed, max(1, args.batch_size))
    except (ModelPathError, CheckpointError, DataError, ValueError, OSError) as err:
        print(f"mpnet-dist eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(summary(result), file=sys.stderr)
    print(json.dumps(result))
    return 0
