"""`mpnet-dist fill-mask PATH "text with <mask>"`: the top predictions for every masked token, and the
held-out demo training prints at its end (--fill-mask-demo N).

Inference is the Hugging Face fill-mask convention: the text with `<mask>` in place of a token goes through
the encoder once and the LM head scores every mask position (inference.py loads checkpoints and HF folders).
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from mpnet_dist.inference import LoadedModel, ModelPathError, load_model

logger = logging.getLogger("mpnet_dist")

MASK_LITERAL = "<mask>"
_WORD = re.compile(r"^[a-z]{3,}$")


def fill_mask(loaded: LoadedModel, text: str, top_k: int = 3) -> list[list[tuple[str, float]]]:
    """For each mask of `text`, left to right: the top_k (token, probability) pairs."""
    tokenizer = loaded.tokenizer
    text = text.replace(MASK_LITERAL, tokenizer.mask_token)  # tokenizers that spell it [MASK] too
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=loaded.max_positions)["input_ids"]
    where = (ids[0] == tokenizer.mask_token_id).nonzero().flatten()
    if where.numel() == 0:
        raise ModelPathError(f"the text holds no {MASK_LITERAL}: write it where a word should be predicted")
    with torch.no_grad():
        probs = loaded.mlm_logits(ids, torch.ones_like(ids))[0, where].float().softmax(-1)  # [masks, V]
    # Padded vocabulary rows and special tokens are never an answer.
    probs[:, len(tokenizer) :] = 0
    probs[:, tokenizer.all_special_ids] = 0
    top = probs.topk(top_k, dim=-1)
    return [
        [(tokenizer.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(ps, is_, strict=True)]
        for ps, is_ in zip(top.values, top.indices, strict=True)
    ]


def format_predictions(predictions: list[list[tuple[str, float]]]) -> str:
    return "\n".join(
        f"  <mask> {n + 1}: " + " | ".join(f"{token} {p:.3f}" for token, p in options)
        for n, options in enumerate(predictions)
    )


def demo_sentences(texts: list[str], tokenizer: Any, count: int, seed: int) -> list[tuple[str, str]]:
    """(sentence with one word masked, that word) from the first sentences of held-out documents.

    The masked word is a lowercase word of 3+ letters that the tokenizer keeps whole, so one <mask> stands
    for exactly the answer; sentences of 6-25 words, chosen reproducibly by `seed`.
    """
    rng = random.Random(seed)
    picked = []
    for text in texts:
        sentence = text.split(". ")[0].rstrip(".") + "."
        words = sentence.split()
        if not 6 <= len(words) <= 25:
            continue
        options = [
            i for i, w in enumerate(words) if i > 0 and _WORD.match(w) and len(tokenizer.tokenize(w)) == 1
        ]
        if not options:
            continue
        i = rng.choice(options)
        picked.append((" ".join([*words[:i], MASK_LITERAL, *words[i + 1 :]]), words[i]))
        if len(picked) == count:
            break
    return picked


def run_demo(checkpoint: Path, texts: list[str], count: int, seed: int) -> str:
    """The end-of-training demo: the saved checkpoint on `count` held-out sentences, as printable text."""
    loaded = load_model(checkpoint)
    lines = [f"fill-mask demo: {checkpoint} on held-out sentences (top 3 for the masked word in [brackets])"]
    for sentence, answer in demo_sentences(texts, loaded.tokenizer, count, seed):
        (options,) = fill_mask(loaded, sentence)
        hit = "  <- right" if options[0][0] in (answer, answer.lower()) else ""
        lines.append(f"  {sentence}   [{answer}]")
        lines.append("      " + " | ".join(f"{token} {p:.3f}" for token, p in options) + hit)
    return "\n".join(lines)


def print_demo(cfg: Any, checkpoint: Path) -> None:
    """Training's --fill-mask-demo N (rank 0, after the final save); a failure only warns."""
    from mpnet_dist.data.corpus import materialize_builtin_corpus
    from mpnet_dist.data.sources import read_documents

    if cfg.valid_file:
        valid = Path(cfg.valid_file)
    elif cfg.dataset_name == "builtin" and not cfg.train_dir:
        valid = materialize_builtin_corpus(cfg.data_cache_dir).valid_file
    else:
        logger.warning("--fill-mask-demo needs held-out text: a --valid-file or --dataset-name builtin")
        return
    try:
        texts = list(read_documents(valid, cfg.text_field))
        print(run_demo(checkpoint, texts, cfg.fill_mask_demo, cfg.seed), flush=True)
    except Exception as err:  # a demo must never turn a finished run into a failed one
        logger.warning("fill-mask demo failed (%s: %s)", type(err).__name__, err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mpnet-dist fill-mask",
        description="Top predictions for each <mask> in a text, from a checkpoint (any kind) or a HF MPNet folder.",
    )
    parser.add_argument(
        "path", type=Path, metavar="CHECKPOINT_OR_HF", help="checkpoint, run directory or HF folder"
    )
    parser.add_argument(
        "text", help=f'text with one or more {MASK_LITERAL}, e.g. "Return the {MASK_LITERAL} of x."'
    )
    parser.add_argument("--top-k", type=int, default=3, help="predictions per mask (default 3)")
    parser.add_argument("--tokenizer-name", default=None, help="tokenizer (default: the model's own)")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow pickled checkpoint files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from mpnet_dist.checkpoint import CheckpointError
    from mpnet_dist.data import DataError

    try:
        if args.top_k < 1:
            raise ModelPathError(f"--top-k {args.top_k}: must be >= 1")
        loaded = load_model(args.path, trust=args.trust_checkpoint, tokenizer_name=args.tokenizer_name)
        predictions = fill_mask(loaded, args.text, args.top_k)
    except (ModelPathError, CheckpointError, DataError, ValueError, OSError) as err:
        print(f"mpnet-dist fill-mask: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(args.text)
    print(format_predictions(predictions))
    return 0
