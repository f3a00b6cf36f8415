"""Conversion to and from transformers' MPNetForMaskedLM (weights and config, both directions)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers
from torch import Tensor

from mpnet_dist.errors import UserError

from .config import MPNetConfig
from .mpnet import MPNetForPretraining

# Settings HF can represent but that only matter for training; from_hf accepts them as overrides.
RUNTIME_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "attn_impl", "gradient_checkpointing")
# HF MPNet hard-codes these at run time whatever its config says.
HF_PADDING_IDX = 1
HF_NUM_BUCKETS = 32
HF_MAX_DISTANCE = 128
# Wrappers that prefix parameter names: torch.compile and DDP.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")

_ENC = "sentence_encoder."
_HF_LAYER = "mpnet.encoder.layer."
# Our name -> HF name for every tensor that maps one to one; q/k/v are split separately.
_STATIC_KEYS = {
    _ENC + "embed_tokens.weight": "mpnet.embeddings.word_embeddings.weight",
    _ENC + "embed_positions.weight": "mpnet.embeddings.position_embeddings.weight",
    _ENC + "emb_layer_norm.weight": "mpnet.embeddings.LayerNorm.weight",
    _ENC + "emb_layer_norm.bias": "mpnet.embeddings.LayerNorm.bias",
    _ENC + "relative_attention_bias.weight": "mpnet.encoder.relative_attention_bias.weight",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_LAYER_KEYS = {
    "self_attn.out_proj": "attention.attn.o",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "output.LayerNorm",
}


class HFExportError(UserError, ValueError):
    """The model uses a setting transformers' MPNetForMaskedLM cannot represent."""


def export_problems(config: MPNetConfig) -> list[str]:
    """Every setting that keeps `config` from being exported, one message each, naming the field."""
    problems = []
    if config.normalize_before:
        problems.append("normalize_before=True: HF MPNet is post-LN only")
    if config.relative_attention_num_buckets != HF_NUM_BUCKETS:
        problems.append(
            f"relative_attention_num_buckets={config.relative_attention_num_buckets}: "
            f"HF MPNet always uses {HF_NUM_BUCKETS} buckets at run time"
        )
    if config.relative_attention_max_distance != HF_MAX_DISTANCE:
        problems.append(
            f"relative_attention_max_distance={config.relative_attention_max_distance}: "
            f"HF MPNet always uses max distance {HF_MAX_DISTANCE}"
        )
    if config.padding_idx != HF_PADDING_IDX:
        problems.append(
            f"padding_idx={config.padding_idx}: HF MPNet derives position ids from token id "
            f"{HF_PADDING_IDX} being padding"
        )
    if config.activation_fn != "gelu":
        problems.append(
            f"activation_fn={config.activation_fn!r}: our LM head applies it, HF's MPNetLMHead always uses gelu"
        )
    return problems


def hf_config(config: MPNetConfig, bos_token_id: int = 0, eos_token_id: int = 2) -> transformers.MPNetConfig:
    problems = export_problems(config)
    if problems:
        raise HFExportError("cannot export to HF MPNetForMaskedLM: " + "; ".join(problems))
    return transformers.MPNetConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.encoder_embed_dim,
        num_hidden_layers=config.encoder_layers,
        num_attention_heads=config.encoder_attention_heads,
        intermediate_size=config.encoder_ffn_dim,
        hidden_act=config.activation_fn,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        # HF's table covers rows 0 .. max_positions + padding_idx; padding_idx is 1 here.
        max_position_embeddings=config.max_positions + HF_PADDING_IDX + 1,
        layer_norm_eps=config.layer_norm_eps,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        pad_token_id=config.padding_idx,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def to_hf_state_dict(state_dict: dict[str, Tensor], config: MPNetConfig) -> dict[str, Tensor]:
    """Our names -> HF names; clean contiguous CPU copies, tied tensors written under both names."""
    sd = strip_wrapper_prefixes(state_dict)
    out = {hf: sd[ours] for ours, hf in _STATIC_KEYS.items()}
    dim = config.encoder_embed_dim
    for i in range(config.encoder_layers):
        ours, hf = f"{_ENC}layers.{i}.", f"{_HF_LAYER}{i}."
        for part in ("weight", "bias"):
            fused = sd[f"{ours}self_attn.in_proj_{part}"]  # [3H, ...], rows q | k | v
            for j, name in enumerate("qkv"):
                out[f"{hf}attention.attn.{name}.{part}"] = fused[j * dim : (j + 1) * dim]
            for src, dst in _LAYER_KEYS.items():
                out[f"{hf}{dst}.{part}"] = sd[f"{ours}{src}.{part}"]
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}
    out["lm_head.decoder.weight"] = out["mpnet.embeddings.word_embeddings.weight"]
    out["lm_head.decoder.bias"] = out["lm_head.bias"]
    return out


def from_hf_state_dict(state_dict: dict[str, Tensor], config: MPNetConfig) -> dict[str, Tensor]:
    """HF names -> our names (the tied LM-head weight appears under both of ours)."""
    sd = strip_wrapper_prefixes(state_dict)
    out = {ours: sd[hf] for ours, hf in _STATIC_KEYS.items()}
    for i in range(config.encoder_layers):
        ours, hf = f"{_ENC}layers.{i}.", f"{_HF_LAYER}{i}."
        for part in ("weight", "bias"):
            qkv = [sd[f"{hf}attention.attn.{name}.{part}"] for name in "qkv"]
            out[f"{ours}self_attn.in_proj_{part}"] = torch.cat(qkv, dim=0)
            for dst, src in _LAYER_KEYS.items():
                out[f"{ours}{dst}.{part}"] = sd[f"{hf}{src}.{part}"]
    out["lm_head.weight"] = out[_ENC + "embed_tokens.weight"]
    return out


def to_hf(
    model: MPNetForPretraining,
    state_dict: dict[str, Tensor] | None = None,
    bos_token_id: int = 0,
    eos_token_id: int = 2,
) -> transformers.MPNetForMaskedLM:
    """Build an HF MPNetForMaskedLM (on CPU) carrying the model's weights.

    state_dict: use this instead of model.state_dict(), e.g. one gathered from ZeRO-3 shards.
    Raises HFExportError naming every setting HF cannot represent.
    """
    config = model.config
    hf_cfg = hf_config(config, bos_token_id, eos_token_id)
    weights = to_hf_state_dict(state_dict if state_dict is not None else model.state_dict(), config)
    dtype = weights["mpnet.embeddings.word_embeddings.weight"].dtype
    hf = transformers.MPNetForMaskedLM(hf_cfg).to(dtype)
    hf.load_state_dict(weights, strict=True)
    hf.tie_weights()
    if hf.lm_head.decoder.weight is not hf.mpnet.embeddings.word_embeddings.weight:
        raise HFExportError("HF model did not tie lm_head.decoder.weight to the word embeddings")
    return hf.eval()


def _load_hf_folder(path: str) -> transformers.MPNetForMaskedLM:
    """MPNetForMaskedLM from a folder, refusing other model families and missing weights.

    from_pretrained alone would load a BERT folder into MPNet with every weight freshly initialized.
    """
    model_type = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
    if model_type != "mpnet":
        raise ValueError(
            f"{path} holds a {model_type!r} model, not MPNet; --hf-model-path needs an MPNet folder "
            "(MPNetForMaskedLM or MPNetModel)"
        )
    hf, info = transformers.MPNetForMaskedLM.from_pretrained(path, output_loading_info=True)
    # A bare MPNetModel folder lacks the LM head only: that head is initialized fresh (with a warning).
    missing = [k for k in info["missing_keys"] if not k.startswith("lm_head.")]
    if missing:
        raise ValueError(f"{path} lacks weights MPNet needs ({', '.join(sorted(missing)[:5])} ...)")
    if any(k.startswith("lm_head.") for k in info["missing_keys"]):
        warnings.warn(f"{path} has no MLM head; the LM head is freshly initialized", stacklevel=3)
    return hf


def from_hf(
    path_or_model: str | Path | transformers.PreTrainedModel, **overrides: object
) -> MPNetForPretraining:
    """Our model from an HF MPNet folder or instance (MPNetForMaskedLM, or MPNetModel with a fresh head).

    overrides: training-only settings (dropouts, attn_impl, gradient_checkpointing).
    """
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"from_hf: {bad} cannot be overridden; only {list(RUNTIME_FIELDS)}")
    if isinstance(path_or_model, (str, Path)):
        hf = _load_hf_folder(str(path_or_model))
    else:
        hf = path_or_model
    config = MPNetConfig.from_dict({**_config_from_hf(hf.config).to_dict(), **overrides})
    model = MPNetForPretraining(config)
    state_dict = hf.state_dict()
    if isinstance(hf, transformers.MPNetModel):
        warnings.warn("from_hf: MPNetModel has no LM head; the head is freshly initialized", stacklevel=2)
        state_dict = {"mpnet." + k: v for k, v in state_dict.items()}
        # Our head's own (fresh) tensors; their names are the HF names from_hf_state_dict reads.
        state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith("lm_head.")})
    elif not hasattr(hf, "lm_head"):
        raise TypeError(f"from_hf: expected MPNetForMaskedLM or MPNetModel, got {type(hf).__name__}")
    weights = from_hf_state_dict(state_dict, config)
    model.load_state_dict(weights, strict=True)
    return model


def _config_from_hf(hf_cfg: transformers.MPNetConfig) -> MPNetConfig:
    if hf_cfg.hidden_act != "gelu":
        raise ValueError(
            f"from_hf: hidden_act={hf_cfg.hidden_act!r} is not supported; our LM head applies the FFN "
            "activation, HF's always applies gelu"
        )
    if hf_cfg.relative_attention_num_buckets != HF_NUM_BUCKETS:
        raise ValueError(
            f"from_hf: relative_attention_num_buckets={hf_cfg.relative_attention_num_buckets}; HF runs "
            f"with {HF_NUM_BUCKETS} whatever its config says, so these weights are ambiguous"
        )
    return MPNetConfig(
        vocab_size=hf_cfg.vocab_size,
        encoder_layers=hf_cfg.num_hidden_layers,
        encoder_embed_dim=hf_cfg.hidden_size,
        encoder_ffn_dim=hf_cfg.intermediate_size,
        encoder_attention_heads=hf_cfg.num_attention_heads,
        dropout=float(hf_cfg.hidden_dropout_prob),
        attention_dropout=float(hf_cfg.attention_probs_dropout_prob),
        activation_dropout=0.0,  # HF's FFN has no dropout after the activation
        activation_fn="gelu",
        max_positions=hf_cfg.max_position_embeddings - HF_PADDING_IDX - 1,
        relative_attention_num_buckets=HF_NUM_BUCKETS,
        relative_attention_max_distance=HF_MAX_DISTANCE,
        normalize_before=False,
        padding_idx=HF_PADDING_IDX,
        layer_norm_eps=float(hf_cfg.layer_norm_eps),
    )


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop torch.compile / DDP wrapper prefixes, in any order and nesting ("module._orig_mod.x" -> "x")."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out
