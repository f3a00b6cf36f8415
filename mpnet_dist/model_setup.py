"""Which model a run trains: from the flags, from a checkpoint's recorded architecture, or from a HF folder."""

from __future__ import annotations

import logging
import math

from mpnet_dist.checkpoint import TrainState
from mpnet_dist.model import MPNetConfig, MPNetForPretraining, from_hf

logger = logging.getLogger("mpnet_dist")

VOCAB_MULTIPLE = 128  # padded vocabulary rows make the LM-head matmul tile evenly on GPUs


def model_config_from_flags(cfg, tokenizer) -> MPNetConfig:
    vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return MPNetConfig(
        vocab_size=vocab,
        encoder_layers=cfg.encoder_layers,
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        encoder_attention_heads=cfg.encoder_attention_heads,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        activation_fn=cfg.activation_fn,
        max_positions=cfg.resolved_max_positions(),
        relative_attention_num_buckets=cfg.relative_attention_num_buckets or 32,
        relative_attention_max_distance=cfg.relative_attention_max_distance or 128,
        normalize_before=cfg.normalize_before,
        padding_idx=tokenizer.pad_token_id,
        attn_impl=cfg.attn_impl,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def build_model(cfg, tokenizer, saved_train_state: TrainState | None) -> MPNetForPretraining:
    """A checkpoint's architecture wins over the flags (as in the reference); runtime knobs come from the flags."""
    if saved_train_state is not None:
        model_cfg = MPNetConfig.from_dict(saved_train_state.model_config)
        flags_cfg = model_config_from_flags(cfg, tokenizer)
        differing = [
            k
            for k, v in flags_cfg.to_dict().items()
            if k not in ("attn_impl", "gradient_checkpointing") and model_cfg.to_dict().get(k) != v
        ]
        if differing:
            logger.warning(
                "resuming: architecture taken from the checkpoint; flags ignored for: %s",
                ", ".join(differing),
            )
        model_cfg.attn_impl = cfg.attn_impl
        model_cfg.gradient_checkpointing = cfg.gradient_checkpointing
        return MPNetForPretraining(model_cfg)  # weights come from the checkpoint
    if cfg.hf_model_path:
        model = from_hf(cfg.hf_model_path)
        model.config.attn_impl = cfg.attn_impl
        model.config.gradient_checkpointing = cfg.gradient_checkpointing
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"--tokenizer-name has {len(tokenizer)} tokens but {cfg.hf_model_path} has only "
                f"{model.config.vocab_size} embedding rows: use the tokenizer the model was trained with"
            )
        logger.info("initialized from Hugging Face folder %s", cfg.hf_model_path)
        return model
    model_cfg = model_config_from_flags(cfg, tokenizer)
    if tokenizer.pad_token_id != 1:
        logger.warning(
            "the tokenizer's padding id is %d, not 1: training works, but Hugging Face MPNet hard-codes padding id 1 "
            "for position ids, so `mpnet-dist export` will refuse this model. Use an MPNet-layout tokenizer "
            "(`--tokenizer-name builtin` or `mpnet-dist tokenizer`) to keep it exportable.",
            tokenizer.pad_token_id,
        )
    return MPNetForPretraining(model_cfg)
