"""The reference trainer's (annotated-mpnet) `.pt` files, `{"args": ..., "model_states": ...}`.

Their parameter names are ours, so a migrating user can export what the old trainer wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from mpnet_dist.checkpoint import CheckpointError, TrainState
from mpnet_dist.checkpoint.weights_only import torch_load
from mpnet_dist.export.weights import load_complete_state_dict
from mpnet_dist.model import HFExportError, MPNetConfig, MPNetForPretraining
from mpnet_dist.model.hf import strip_wrapper_prefixes


def load_reference_checkpoint(file: Path, trust: bool = False) -> tuple[MPNetForPretraining, TrainState]:
    """(model, a train state carrying what the export needs) from an annotated-mpnet `.pt` checkpoint."""
    data = torch_load(file, trust)
    if not isinstance(data, dict) or "model_states" not in data or "args" not in data:
        raise CheckpointError(
            f"{file} is neither an mpnet-dist checkpoint folder nor an annotated-mpnet .pt file (with 'args' and "
            "'model_states')"
        )
    args = data["args"] if isinstance(data["args"], dict) else vars(data["args"])
    state_dict = strip_wrapper_prefixes(data["model_states"])
    config = reference_model_config(args, state_dict)
    model = MPNetForPretraining(config)
    load_complete_state_dict(model, state_dict, source=str(file))
    train_state = TrainState(
        step=data.get("steps"),  # None when the file does not record it
        model_config=config.to_dict(),
        tokenizer_name=args.get("tokenizer_name") or "microsoft/mpnet-base",
    )
    return model.float().eval(), train_state


def reference_model_config(args: dict[str, Any], state_dict: dict[str, Tensor]) -> MPNetConfig:
    """The reference's flags -> MPNetConfig; sizes the flags leave implicit are read off the weights."""
    activation = args.get("activation_fn", "gelu")
    if activation != "gelu":  # checked here: the reference allows activations our model does not have
        raise HFExportError(f"activation_fn={activation!r}: HF's MPNetLMHead always uses gelu")
    if any(key.startswith("sentence_encoder.segment_embeddings") for key in state_dict):
        raise HFExportError("num_segments > 0: HF MPNet has no token-type (segment) embeddings")
    max_positions = args.get("max_positions") or args.get("max_tokens") or 512
    position_rows = state_dict["sentence_encoder.embed_positions.weight"].shape[0]
    # Auto-scaled as the reference does when the flag is None (anchor: round up to 8 of 128 * L / 512).
    max_distance = args.get("relative_attention_max_distance") or _round_up_8(
        max(128, 128 * max_positions // 512)
    )
    return MPNetConfig(
        vocab_size=state_dict["sentence_encoder.embed_tokens.weight"].shape[0],
        encoder_layers=args.get("encoder_layers", 12),
        encoder_embed_dim=args.get("encoder_embed_dim", 768),
        encoder_ffn_dim=args.get("encoder_ffn_dim", 3072),
        encoder_attention_heads=args.get("encoder_attention_heads", 12),
        dropout=args.get("dropout", 0.1),
        attention_dropout=args.get("attention_dropout", 0.1),
        activation_dropout=args.get("activation_dropout", 0.1),
        max_positions=max_positions,
        relative_attention_num_buckets=state_dict["sentence_encoder.relative_attention_bias.weight"].shape[0],
        relative_attention_max_distance=max_distance,
        normalize_before=bool(args.get("normalize_before", False)),
        padding_idx=position_rows - max_positions - 1,  # the table has max_positions + padding_idx + 1 rows
        layer_norm_eps=1e-5,  # the reference's LayerNorm (Apex or torch) default
    )


def _round_up_8(value: int) -> int:
    return (value + 7) // 8 * 8
