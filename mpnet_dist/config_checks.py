"""The checks TrainConfig makes on its values: each problem is one phrase naming the flag, all reported at once."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpnet_dist.config import TrainConfig

DEEPSPEED_OVERRIDES_ENV = "MPNET_DIST_DEEPSPEED_OVERRIDES"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def min_max_tokens(pred_prob: float) -> int:
    """The smallest --max-tokens: 2 specials + ceil(1 / pred_prob) tokens (9 at 0.15), so that the one predicted
    token a short block must have is the fraction asked for, not a forced minimum."""
    return 2 + math.ceil(1 / pred_prob - 1e-9)


def config_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with `cfg`'s values; empty when nothing is."""
    problems = []
    positive = (
        "encoder_layers",
        "encoder_embed_dim",
        "encoder_ffn_dim",
        "encoder_attention_heads",
        "max_tokens",
        "batch_size",
        "update_freq",
        "logging_steps",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.encoder_embed_dim % max(cfg.encoder_attention_heads, 1):
        problems.append(
            f"{flag('encoder_embed_dim')} ({cfg.encoder_embed_dim}) must be divisible by "
            f"{flag('encoder_attention_heads')} ({cfg.encoder_attention_heads})"
        )
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            problems.append(f"{flag(name)} must be in [0, 1) (got {getattr(cfg, name)})")
    if not 0.0 < cfg.pred_prob < 1.0:
        problems.append(f"{flag('pred_prob')} must be in (0, 1) (got {cfg.pred_prob})")
    if cfg.rand_prob < 0 or cfg.keep_prob < 0 or cfg.rand_prob + cfg.keep_prob > 1.0:
        problems.append(f"{flag('rand_prob')} + {flag('keep_prob')} must be within [0, 1]")
    if 0 < cfg.pred_prob < 1 and cfg.max_tokens < min_max_tokens(cfg.pred_prob):
        problems.append(
            f"{flag('max_tokens')} {cfg.max_tokens} is below {min_max_tokens(cfg.pred_prob)}: a block needs "
            f"<s> and </s> plus enough tokens that {flag('pred_prob')} {cfg.pred_prob} of them is one whole "
            "token (below that, one token in three or four would be predicted instead)"
        )
    if cfg.resolved_max_positions() < cfg.max_tokens:
        problems.append(
            f"{flag('max_positions')} ({cfg.max_positions}) must be >= {flag('max_tokens')} ({cfg.max_tokens})"
        )
    if cfg.warmup_updates is not None and cfg.warmup_updates < 0:
        problems.append(f"{flag('warmup_updates')} must be >= 0 (got {cfg.warmup_updates})")
    for name in (
        "total_updates",
        "eval_samples",
        "num_workers",
        "prefetch_steps",
        "min_text_length",
        "max_nonfinite_skips",
        "fill_mask_demo",
    ):
        if getattr(cfg, name) < 0:
            problems.append(f"{flag(name)} must be >= 0 (got {getattr(cfg, name)})")
    problems += _distributed_problems(cfg)
    if cfg.keep_checkpoints < -1:
        problems.append(f"{flag('keep_checkpoints')} must be -1 (keep all) or >= 0")
    if cfg.clip_grad_norm < 0 or not math.isfinite(cfg.lr) or cfg.lr <= 0:
        problems.append(f"{flag('clip_grad_norm')} must be >= 0 and {flag('lr')} > 0")
    files = [cfg.train_dir, cfg.valid_file, cfg.test_file]
    if any(files) and not all(files):
        problems.append("--train-dir, --valid-file and --test-file must be given together")
    if cfg.attn_impl == "flex" and cfg.attention_dropout > 0:
        problems.append(
            f"{flag('attn_impl')} flex has no attention dropout: add {flag('attention_dropout')} 0 "
            f"(got {cfg.attention_dropout}), or keep {flag('attn_impl')} sdpa"
        )
    if cfg.hf_model_path and cfg.resume:
        problems.append(
            "--hf-model-path cannot be combined with --resume/--resume-checkpoint "
            "(a checkpoint already holds the weights)"
        )
    return problems


def _distributed_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for name in ("data_streams", "global_batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.dist_timeout_s < 1:
        problems.append(f"{flag('dist_timeout_s')} must be >= 1 (got {cfg.dist_timeout_s})")
    if not cfg.startup_timeout_s > 0 or not cfg.node_timeout_s >= 0:
        problems.append(f"{flag('startup_timeout_s')} must be > 0 and {flag('node_timeout_s')} >= 0")
    if cfg.deepspeed_overrides is not None and not isinstance(_json_object(cfg.deepspeed_overrides), dict):
        problems.append(
            f"{flag('deepspeed_overrides')} (or ${DEEPSPEED_OVERRIDES_ENV}) must be a JSON object "
            f'such as \'{{"zero_optimization": {{"stage3_param_persistence_threshold": 0}}}}\', got '
            f"{cfg.deepspeed_overrides!r}"
        )
    return problems


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
