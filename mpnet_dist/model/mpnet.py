"""MPNet encoder with the two-stream (content + query) pretraining forward and an HF-style encode."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mpnet_dist.loss import projection_loss

from .attention import AttentionKernel, RelativeSelfAttention, get_kernel
from .config import MPNetConfig
from .dropout import Dropout
from .layout import AttentionLayout

INIT_STD = 0.02


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    activations = {
        "gelu": F.gelu,
        "relu": F.relu,
        "silu": F.silu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    }
    if name not in activations:
        raise ValueError(f"activation_fn must be one of {sorted(activations)}, got {name!r}")
    return activations[name]


class EncoderLayer(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.normalize_before = config.normalize_before
        self.self_attn = RelativeSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.activation = get_activation(config.activation_fn)
        self.dropout = Dropout(config.dropout)
        self.activation_dropout = Dropout(config.activation_dropout)

    def forward(
        self, x: Tensor, num_kv: int, prepared: Any, kernel: AttentionKernel, first_row: int = 0
    ) -> Tensor:
        """x [B, T, H] -> [B, T - first_row, H]: rows before first_row are only keys/values here."""
        residual = x[:, first_row:]
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = residual + self.dropout(self.self_attn(x, num_kv, prepared, kernel, first_row))
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation_dropout(self.activation(self.fc1(x))))
        x = residual + self.dropout(x)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class WordEmbedding(nn.Embedding):
    """nn.Embedding whose gradient is sparse on a CPU in eager mode.

    The table is tied to the LM head, whose backward already gives a dense [V, H] gradient. A dense lookup
    gradient would first zero another [V, H] tensor (22 ms per step at 4 x 256 on one core) and then add it in
    full; a sparse one is added into the head's gradient row by row before the optimizer sees one dense
    gradient (autograd sums both first), so DDP, DeepSpeed and the optimizer are unchanged. CUDA and
    torch.compile keep the dense gradient (not measured there; compiled graphs take dense gradients only).
    """

    def forward(self, input_ids: Tensor) -> Tensor:
        sparse = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
        return F.embedding(input_ids, self.weight, self.padding_idx, sparse=sparse)


class SentenceEncoder(nn.Module):
    """Embeddings, the relative-bias table shared by all layers, and the layer stack."""

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.encoder_embed_dim
        self.embed_tokens = WordEmbedding(config.vocab_size, dim, padding_idx=config.padding_idx)
        # Rows 0..padding_idx are never used by a real token; the first one sits at padding_idx + 1.
        self.embed_positions = nn.Embedding(
            config.max_positions + config.padding_idx + 1, dim, padding_idx=config.padding_idx
        )
        self.emb_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.encoder_attention_heads
        )
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.final_layer_norm = (
            nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.normalize_before else None
        )

    def embed(self, input_ids: Tensor, position_rows: Tensor) -> Tensor:
        """input_ids, position_rows [B, T] (rows of the position table) -> [B, T, H]."""
        x = self.embed_tokens(input_ids) + self.embed_positions(position_rows)
        return self.dropout(self.emb_layer_norm(x))

    def run_layers(self, x: Tensor, num_kv: int, layout: AttentionLayout, output_from: int = 0) -> Tensor:
        """x [B, T, H] -> [B, T - output_from, H]: only rows output_from.. of the last layer are computed.

        The last layer's other rows feed nothing (its keys and values come from its input), so the
        two-stream forward skips them: their query projection, attention rows, FFN and LayerNorms.
        """
        kernel = get_kernel(self.config.attn_impl)
        # The bias (and mask) is built once per forward and shared by every layer.
        prepared = kernel.prepare(self.relative_attention_bias, layout)
        last_prepared = kernel.rows_from(prepared, output_from) if output_from else prepared
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            args = (
                (x, num_kv, prepared, kernel)
                if index < last
                else (x, num_kv, last_prepared, kernel, output_from)
            )
            if use_checkpoint:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x

    def two_stream(
        self, input_ids: Tensor, positions: Tensor, pred_size: int, padding_mask: Tensor | None
    ) -> Tensor:
        """Two-stream batch -> query-stream hidden states [B, p, H]."""
        total = input_ids.size(1)
        seq_len = total - 2 * pred_size
        if pred_size < 0 or seq_len < pred_size:
            raise ValueError(f"pred_size={pred_size} does not fit a two-stream row of {total} slots")
        num_kv = seq_len + pred_size
        x = self.embed(input_ids, positions + (self.config.padding_idx + 1))  # [B, L+2p, H]
        if pred_size == 0:
            return x[:, num_kv:]  # no query stream
        # Bias from the permuted positions; query rows take the rows of the first mask copy.
        layout = AttentionLayout.for_two_stream(positions, pred_size, padding_mask, self.config)
        return self.run_layers(x, num_kv, layout, output_from=num_kv)  # [B, p, H]

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """HF MPNetModel conventions -> [B, L, H]."""
        pad_idx = self.config.padding_idx
        not_pad = input_ids.ne(pad_idx).long()
        # HF's rule: real tokens count up from padding_idx + 1, padding sits at row padding_idx.
        position_rows = torch.cumsum(not_pad, dim=1) * not_pad + pad_idx
        x = self.embed(input_ids, position_rows)
        padding = None if attention_mask is None else attention_mask == 0  # [B, L]
        layout = AttentionLayout.for_sequence(input_ids.size(1), padding, self.config)
        return self.run_layers(x, input_ids.size(1), layout)


class LMHead(nn.Module):
    """dense -> activation -> LayerNorm -> tied projection + own bias."""

    def __init__(self, config: MPNetConfig, weight: nn.Parameter) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.dense = nn.Linear(dim, dim)
        self.activation = get_activation(config.activation_fn)
        self.layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.weight = weight  # the word-embedding Parameter itself
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits [..., V]; with targets [...]: (summed cross-entropy, correct predictions), computed without
        handing the logits back (mpnet_dist.loss.projection_loss fuses projection and loss where measured faster).
        """
        x = self.layer_norm(self.activation(self.dense(x)))
        if targets is not None:
            return projection_loss(x, self.weight, self.bias, targets)
        return F.linear(x, self.weight, self.bias)


class MPNetForPretraining(nn.Module):
    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        self.config = config
        self.sentence_encoder = SentenceEncoder(config)
        self.lm_head = LMHead(config, self.sentence_encoder.embed_tokens.weight)
        self.apply(init_weights)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        pred_size: int,
        padding_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Two-stream batch (input_ids/positions/padding_mask [B, L+2p]) -> logits [B, p, V], or with targets
        [B, p]: (summed cross-entropy over the predicted tokens, correct predictions), as
        mpnet_dist.loss.prediction_loss(logits, targets) gives.

        positions are 0-based original positions; padding_mask is True at padding, or None.
        """
        query = self.sentence_encoder.two_stream(input_ids, positions, pred_size, padding_mask)
        return self.lm_head(query, targets)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[B, L] ids, attention_mask 1 = keep (HF convention) -> hidden states [B, L, H]."""
        return self.sentence_encoder.encode(input_ids, attention_mask)

    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[B, L] -> [B, L, V], as transformers.MPNetForMaskedLM."""
        return self.lm_head(self.encode(input_ids, attention_mask))


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """BERT init: N(0, 0.02) matrices and embeddings, zero biases and padding rows, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, INIT_STD)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, INIT_STD)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, RelativeSelfAttention):
        module.in_proj_weight.normal_(0.0, INIT_STD)
        module.in_proj_bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, LMHead):
        module.bias.zero_()
