"""The self-check every export runs: reload the folder with transformers and compare it with our model.

What is compared:
- loading: no missing, unexpected or mismatched keys; lm_head.decoder tied to the word embeddings;
- config.json: every architectural field against the model's config;
- MLM logits on a fixed batch with padding, HF model loaded in fp32 versus our model carrying the same
  (exported) weights: max |diff| <= 1e-4 * max(1, max |logit|). For a bfloat16 export this catches every
  conversion error exactly as for float32; the rounding cost of bf16 is then measured separately, with HF
  running natively in bf16 against our fp32 model, and must stay within 5% of the largest logit;
- tokenizer (when saved): AutoTokenizer reloads it with the same ids for a sample text and padding id 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

from mpnet_dist.export.errors import ExportVerificationError
from mpnet_dist.model import MPNetForPretraining

logger = logging.getLogger("mpnet_dist")

FP32_TOLERANCE = 1e-4  # times max(1, max |logit|)
BF16_NATIVE_TOLERANCE = 0.05  # times max(1, max |logit|): bf16 has an 8-bit mantissa
MAX_CHECK_LENGTH = 136  # long enough to reach the log-spaced buckets beyond distance 128
SAMPLE_TEXT = "Export checks compare logits, not just shapes. Tokenizers must agree too."


def verify_export(
    folder: Path,
    reference: MPNetForPretraining,
    original: MPNetForPretraining,
    tokenizer: Any | None,
    dtype: str,
) -> tuple[float, float, float | None]:
    """-> (max |logit diff|, tolerance, bf16 native max |diff| or None). Raises ExportVerificationError.

    reference: our model carrying the exported weights (fp32); original: the model before any dtype cast.
    """
    hf = _load_checked(folder)
    _check_config(hf.config, reference)
    ids, mask = check_batch(reference.config, tokenizer)
    keep = mask.bool()
    with torch.no_grad():
        ours = reference.mlm_logits(ids, mask)[keep]
        theirs = hf(input_ids=ids, attention_mask=mask).logits[keep]
    diff = (ours - theirs).abs().max().item()
    tolerance = FP32_TOLERANCE * max(1.0, ours.abs().max().item())
    logger.info(
        "export check: max |logit diff| HF vs checkpoint model = %.3g (tolerance %.3g)", diff, tolerance
    )
    if not diff <= tolerance:  # also catches NaN
        raise ExportVerificationError(
            f"HF MPNetForMaskedLM reloaded from {folder} computes different MLM logits: max |diff| {diff:.4g} > "
            f"tolerance {tolerance:.3g}. The conversion is wrong for this model; do not use the folder."
        )
    native = _check_bf16_native(folder, original, ids, mask) if dtype == "bfloat16" else None
    if tokenizer is not None:
        _check_tokenizer(folder, tokenizer)
    return diff, tolerance, native


def check_batch(config: Any, tokenizer: Any | None, batch: int = 4) -> tuple[Tensor, Tensor]:
    """A fixed [B, L] batch: <s> random ordinary tokens </s>, rows of different lengths padded with id 1."""
    length = max(2, min(config.max_positions, MAX_CHECK_LENGTH))
    vocab = len(tokenizer) if tokenizer is not None else config.vocab_size
    specials = set(tokenizer.all_special_ids) if tokenizer is not None else {0, 1, 2, 3}
    specials.add(config.padding_idx)
    ordinary = torch.tensor([i for i in range(min(vocab, config.vocab_size)) if i not in specials])
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    bos, eos = (0 if bos is None else bos), (2 if eos is None else eos)
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((batch, length), config.padding_idx, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for row, n in enumerate([length, length - length // 4, length // 2, 2][:batch]):
        n = max(2, n)
        body = ordinary[torch.randint(len(ordinary), (n - 2,), generator=gen)]
        ids[row, :n] = torch.cat([torch.tensor([bos]), body, torch.tensor([eos])])
        mask[row, :n] = 1
    return ids, mask


def _load_checked(folder: Path) -> transformers.PreTrainedModel:
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True, local_files_only=True
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if info.get("error_msgs"):
        problems["error_msgs"] = list(info["error_msgs"])
    if problems:
        raise ExportVerificationError(f"transformers reloads {folder} with key problems: {problems}")
    if not isinstance(hf, transformers.MPNetForMaskedLM):
        raise ExportVerificationError(f"{folder} reloads as {type(hf).__name__}, not MPNetForMaskedLM")
    if hf.lm_head.decoder.weight.data_ptr() != hf.mpnet.embeddings.word_embeddings.weight.data_ptr():
        raise ExportVerificationError(f"{folder}: lm_head.decoder.weight is not tied to the word embeddings")
    return hf.eval()


def _check_config(hf_cfg: transformers.MPNetConfig, model: MPNetForPretraining) -> None:
    cfg = model.config
    expected = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.encoder_embed_dim,
        "num_hidden_layers": cfg.encoder_layers,
        "num_attention_heads": cfg.encoder_attention_heads,
        "intermediate_size": cfg.encoder_ffn_dim,
        "hidden_act": cfg.activation_fn,
        "max_position_embeddings": cfg.max_positions + cfg.padding_idx + 1,
        "layer_norm_eps": cfg.layer_norm_eps,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "pad_token_id": cfg.padding_idx,
        "tie_word_embeddings": True,
    }
    wrong = {k: (getattr(hf_cfg, k, None), v) for k, v in expected.items() if getattr(hf_cfg, k, None) != v}
    if wrong:
        raise ExportVerificationError(f"config.json disagrees with the model (written, expected): {wrong}")


def _check_bf16_native(folder: Path, original: MPNetForPretraining, ids: Tensor, mask: Tensor) -> float:
    hf = transformers.AutoModelForMaskedLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, local_files_only=True
    )
    keep = mask.bool()
    with torch.no_grad():
        ours = original.float().eval().mlm_logits(ids, mask)[keep]
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).logits.float()[keep]
    diff = (ours - theirs).abs().max().item()
    tolerance = BF16_NATIVE_TOLERANCE * max(1.0, ours.abs().max().item())
    logger.info("export check: bf16 HF vs fp32 checkpoint model = %.3g (tolerance %.3g)", diff, tolerance)
    if not diff <= tolerance:
        raise ExportVerificationError(
            f"the bfloat16 export drifts too far from the fp32 checkpoint: max |diff| {diff:.4g} > {tolerance:.3g}; "
            "export with --dtype float32"
        )
    return diff


def _check_tokenizer(folder: Path, tokenizer: Any) -> None:
    reloaded = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # verbose=False: the sample may exceed a tiny model_max_length; only the ids matter here.
    same_ids = reloaded.encode(SAMPLE_TEXT, verbose=False) == tokenizer.encode(SAMPLE_TEXT, verbose=False)
    if not same_ids or reloaded.pad_token_id != tokenizer.pad_token_id or len(reloaded) != len(tokenizer):
        raise ExportVerificationError(
            f"the tokenizer saved in {folder} does not reload identically (pad id {reloaded.pad_token_id}, "
            f"{len(reloaded)} tokens, same ids for a sample: {same_ids})"
        )
