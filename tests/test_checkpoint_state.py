"""checkpoint/state.py: the schema of train_state.json and of the per-rank data state files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpnet_dist.checkpoint import (
    BlocksDataState,
    CheckpointError,
    StreamDataState,
    TrainState,
    read_train_state,
)
from mpnet_dist.checkpoint.state import (
    read_data_state,
    write_data_state,
    write_train_state,
)

# train_state.json exactly as format_version 1 was first written (mpnet-dist 0.1.0 before the schema existed:
# a dict built in train.py, format_version and world_size added by checkpoint.py), key order included.
V1_TRAIN_STATE = {
    "step": 6,
    "tokens": 1536,
    "pred_tokens": 240,
    "best_valid_loss": None,
    "elapsed_s": 1.25,
    "model_config": {"vocab_size": 640, "encoder_layers": 2, "encoder_embed_dim": 32},
    "tokenizer_name": "/tmp/tok",
    "tokenizer_size": 600,
    "zero_stage": 0,
    "distributed_type": "DistributedType.NO",
    "mpnet_dist_version": "0.1.0",
    "config": {"seed": 7, "data_cache_dir": None},
    "format_version": 1,
    "world_size": 1,
}
# data_state_rank{r}.pt as first written: no format_version.
V1_BLOCKS = {"kind": "blocks", "blocks_consumed": 48, "n_blocks": 771, "data_id": "5549950ee42e6fb53536",
             "seed": 7, "world_size": 2, "batch_size": 4}  # fmt: skip
V1_STREAM = {"kind": "stream", "source": "json|None|train|text|1|0", "seed": 7, "rank": 1, "world_size": 2,
             "readers_per_rank": 1, "next": 0, "readers": [{"pass": 0, "chunk": 1, "cursor": 0, "index": 16,
             "doc": 3, "offset": 5, "blocks": 12}]}  # fmt: skip


def test_version_1_train_state_is_read(tmp_path):
    (tmp_path / "train_state.json").write_text(json.dumps(V1_TRAIN_STATE, indent=2))
    state = read_train_state(tmp_path)
    assert (state.step, state.tokens, state.pred_tokens, state.world_size) == (6, 1536, 240, 1)
    assert state.best_valid_loss == math.inf  # null: no validation yet
    assert state.model_config["encoder_layers"] == 2 and state.config["seed"] == 7
    write_train_state(tmp_path, state)  # and written back byte for byte the same layout
    assert json.loads((tmp_path / "train_state.json").read_text()) == V1_TRAIN_STATE
    assert list(json.loads((tmp_path / "train_state.json").read_text())) == list(V1_TRAIN_STATE)


def test_train_state_round_trip_keeps_a_finite_best_loss(tmp_path):
    state = TrainState(step=3, model_config={"a": 1}, tokenizer_name="tok", best_valid_loss=2.5, zero_stage=3)
    write_train_state(tmp_path, state)
    assert read_train_state(tmp_path) == state


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 2}, r"format_version 2, but this mpnet-dist reads versions 1 to 1: .*newer"),
        ({"format_version": "1"}, "format_version '1'"),
        ({"surprise": 1}, r"unknown keys \['surprise'\]"),
        ({"step": None, "model_config": None}, None),  # values are not type-checked: these read as given
    ],
)
def test_train_state_of_another_version_or_shape_is_refused_naming_the_file(tmp_path, change, message):
    (tmp_path / "train_state.json").write_text(json.dumps({**V1_TRAIN_STATE, **change}))
    if message is None:
        assert read_train_state(tmp_path).step is None
        return
    with pytest.raises(CheckpointError, match=message) as caught:
        read_train_state(tmp_path)
    assert str(tmp_path / "train_state.json") in str(caught.value)


def test_damaged_train_state_names_the_file(tmp_path):
    missing = {k: v for k, v in V1_TRAIN_STATE.items() if k != "model_config"}
    (tmp_path / "train_state.json").write_text(json.dumps(missing))
    with pytest.raises(CheckpointError, match=r"train_state.json: .*model_config"):
        read_train_state(tmp_path)
    (tmp_path / "train_state.json").write_text('{"step": 3,')  # truncated
    with pytest.raises(CheckpointError, match=r"train_state.json: not valid JSON"):
        read_train_state(tmp_path)
    (tmp_path / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete mpnet-dist checkpoint"):
        read_train_state(tmp_path)


@pytest.mark.parametrize("v1, kind", [(V1_BLOCKS, BlocksDataState), (V1_STREAM, StreamDataState)])
def test_version_1_data_states_are_read_and_rewritten_with_their_version(tmp_path, v1, kind):
    torch.save(v1, tmp_path / "data_state_rank1.pt")
    state = read_data_state(tmp_path, 1)
    assert isinstance(state, kind)
    assert state.seed == 7 and state.world_size == 2
    write_data_state(tmp_path, 1, state)
    assert torch.load(tmp_path / "data_state_rank1.pt", weights_only=True) == {"format_version": 1, **v1}


def test_data_state_falls_back_to_rank_0_and_is_none_without_files(tmp_path):
    assert read_data_state(tmp_path, 0) is None
    torch.save(V1_BLOCKS, tmp_path / "data_state_rank0.pt")
    assert read_data_state(tmp_path, 3).blocks_consumed == 48  # a run with more ranks than saved


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 2}, "format_version 2, but this mpnet-dist reads versions 1 to 1"),
        ({"kind": "shards"}, "unknown data state kind 'shards'"),
        ({"rows": 3}, r"unknown keys \['rows'\]"),
    ],
)
def test_data_state_of_another_version_or_kind_is_refused_naming_the_file(tmp_path, change, message):
    torch.save({**V1_BLOCKS, **change}, tmp_path / "data_state_rank0.pt")
    with pytest.raises(CheckpointError, match=message) as caught:
        read_data_state(tmp_path, 0)
    assert str(tmp_path / "data_state_rank0.pt") in str(caught.value)
