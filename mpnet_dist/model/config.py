"""Model configuration: the reference trainer's architecture flags as one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("gelu", "relu", "silu", "gelu_tanh")
ATTN_IMPLS = ("sdpa", "eager", "flex")


@dataclass
class MPNetConfig:
    vocab_size: int = 30527
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_dim: int = 3072
    encoder_attention_heads: int = 12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    activation_fn: str = "gelu"
    # Tokens per sequence including specials; the position table has max_positions + padding_idx + 1 rows.
    max_positions: int = 512
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    normalize_before: bool = False
    padding_idx: int = 1
    layer_norm_eps: float = 1e-5
    attn_impl: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("vocab_size", "encoder_layers", "encoder_embed_dim", "encoder_ffn_dim"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.encoder_attention_heads >= 1, "encoder_attention_heads", "must be >= 1")
        _require(
            self.encoder_embed_dim % self.encoder_attention_heads == 0,
            "encoder_attention_heads",
            f"must divide encoder_embed_dim={self.encoder_embed_dim}",
        )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _require(self.activation_fn in ACTIVATIONS, "activation_fn", f"must be one of {ACTIVATIONS}")
        _require(self.attn_impl in ATTN_IMPLS, "attn_impl", f"must be one of {ATTN_IMPLS}")
        _require(
            self.attn_impl != "flex" or self.attention_dropout == 0.0,
            "attn_impl",
            "'flex' needs attention_dropout 0 (FlexAttention has no attention dropout)",
        )
        _require(self.max_positions >= 1, "max_positions", "must be >= 1")
        _require(
            0 <= self.padding_idx < self.vocab_size,
            "padding_idx",
            f"must be a token id in [0, vocab_size={self.vocab_size})",
        )
        # The bucket function needs an exact range (num_buckets // 4 >= 1) and a log range above it.
        _require(
            self.relative_attention_num_buckets >= 4 and self.relative_attention_num_buckets % 2 == 0,
            "relative_attention_num_buckets",
            "must be an even number >= 4",
        )
        _require(
            self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
            "relative_attention_max_distance",
            f"must exceed relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4}",
        )
        _require(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")

    def _check_types(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[field.type]
            # bool is an int subclass; a YAML `true` must not pass as a layer count.
            bad_bool = isinstance(value, bool) and field.type != "bool"
            if bad_bool or not isinstance(value, expected):
                raise ValueError(f"MPNetConfig.{field.name}: expected {field.type}, got {value!r}")
            if field.type == "float":
                setattr(self, field.name, float(value))

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MPNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MPNetConfig: unknown keys {unknown}")
        return cls(**data)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"MPNetConfig.{field} {message}")
