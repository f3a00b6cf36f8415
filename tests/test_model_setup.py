"""model_setup.py: which model a run trains (flags, a checkpoint's architecture, or a HF folder)."""

from __future__ import annotations

import logging

from mpnet_dist.checkpoint import TrainState
from mpnet_dist.config import parse_config
from mpnet_dist.model_setup import build_model

TINY = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-dim", "64",
        "--encoder-attention-heads", "4", "--max-tokens", "32"]  # fmt: skip


class FakeTokenizer:
    pad_token_id = 1

    def __len__(self) -> int:
        return 600


def test_flags_build_a_model_with_a_padded_vocabulary():
    model = build_model(parse_config(TINY), FakeTokenizer(), None)
    assert model.config.vocab_size == 640  # 600 rounded up to a multiple of 128
    assert (model.config.encoder_layers, model.config.max_positions, model.config.padding_idx) == (2, 32, 1)


def test_a_checkpoint_architecture_wins_but_runtime_knobs_come_from_the_flags(caplog, monkeypatch):
    saved = build_model(parse_config(TINY), FakeTokenizer(), None).config.to_dict()
    state = TrainState(step=3, model_config=saved, tokenizer_name="tok")
    cfg = parse_config([*TINY, "--encoder-layers", "3", "--attn-impl", "eager", "--gradient-checkpointing"])
    monkeypatch.setattr(logging.getLogger("mpnet_dist"), "propagate", True)  # setup_logging may have cut it
    with caplog.at_level(logging.WARNING, logger="mpnet_dist"):
        model = build_model(cfg, FakeTokenizer(), state)
    assert model.config.encoder_layers == 2
    assert (model.config.attn_impl, model.config.gradient_checkpointing) == ("eager", True)
    assert "flags ignored for: encoder_layers" in caplog.text
