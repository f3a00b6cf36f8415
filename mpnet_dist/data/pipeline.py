"""build_data: the config's data flags -> this rank's training iterator and eval sets."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpnet_dist.data.cache import cache_root
from mpnet_dist.data.errors import DataError
from mpnet_dist.data.loader import TEST_TAG, VALID_TAG, EvalBatches, RankBatches, RankShare, TrainBatches
from mpnet_dist.data.packing import BlockLayout, Blocks, build_block_cache, pack_documents
from mpnet_dist.data.sources import check_file, list_train_files, open_stream, take_eval
from mpnet_dist.data.stream import StreamPlan, StreamReader
from mpnet_dist.data.stream_loader import StreamBatches, default_streams
from mpnet_dist.data.tokenizer import Encoder, fingerprint, special_ids, validate_tokenizer
from mpnet_dist.data.unigram import STREAM_DOCS, count_tokens

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"


@dataclass
class Data:
    train: TrainBatches | StreamBatches  # infinite; state_dict() / load_state_dict()
    valid: EvalBatches | None
    test: EvalBatches | None
    spec: Any  # the MaskingSpec every batch was built with
    source_info: str
    # -> (training token counts [V], counts already global on every rank?, what was counted); unigram.py
    token_counts: Callable[[], tuple[Any, bool, str]] | None = None


def masking_spec(cfg: Any, tokenizer: Any) -> Any:
    from mpnet_dist.data.batch import MaskingSpec

    return MaskingSpec(
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        special_ids=special_ids(tokenizer),
        vocab_size=len(tokenizer),
        pred_prob=cfg.pred_prob,
        rand_prob=cfg.rand_prob,
        keep_prob=cfg.keep_prob,
        whole_word=cfg.whole_word_mask,
    )


def build_data(cfg: Any, tokenizer: Any, rank: int, world_size: int) -> Data:
    """This rank's data. Local files (--train-dir, or --dataset-name builtin) go through a block
    cache built once (every rank calls this; the first builds, the others wait); anything else
    is streamed with HF datasets."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    validate_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "the tokenizer"))
    spec = masking_spec(cfg, tokenizer)
    share = RankShare(rank, world_size, cfg.batch_size)
    if cfg.train_dir:
        data = _file_data(cfg, tokenizer, spec, share, (cfg.train_dir, cfg.valid_file, cfg.test_file))
    elif cfg.dataset_name == BUILTIN:
        from mpnet_dist.data.corpus import materialize_builtin_corpus

        corpus = materialize_builtin_corpus(cfg.data_cache_dir)
        files = (corpus.train_dir, corpus.valid_file, corpus.test_file)
        data = _file_data(cfg, tokenizer, spec, share, files)
    else:
        data = _stream_data(cfg, tokenizer, spec, share)
    if cfg.num_workers > 0:
        # The cache was built with the Rust thread pool; forked workers must not use it (tokenizers
        # would disable it and warn in every worker). Set only now, so the build stays parallel.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return data


def _file_data(cfg, tokenizer, spec, share: RankShare, files: tuple[Any, Any, Any]) -> Data:
    """files: (train directory, validation file, test file)."""
    world_size, (train_dir, valid_file, test_file) = share.world_size, files
    encoder, root = Encoder(tokenizer), cache_root(cfg.data_cache_dir)

    layout = BlockLayout(fingerprint(tokenizer), len(tokenizer), cfg.max_tokens, cfg.packing, cfg.text_field)

    def cache(files: list[Path]) -> Blocks:
        return build_block_cache(files, encoder, layout, root)

    train_files = list_train_files(train_dir)
    blocks = cache(train_files)
    _check_train_size(blocks, cfg.batch_size, world_size, f"--train-dir {train_dir}")
    evals = {}
    for name, path, tag in (("valid", valid_file, VALID_TAG), ("test", test_file, TEST_TAG)):
        if path:
            eval_blocks = cache([check_file(path, f"--{name}-file")])
            _check_eval_size(eval_blocks, world_size, f"--{name}-file {path}", "give a larger file")
            evals[name] = EvalBatches(eval_blocks, spec, cfg.seed, tag, share)
    dataset = RankBatches(blocks, spec, cfg.seed, share)
    train = TrainBatches(dataset, cfg.num_workers, data_id=blocks.path.name)
    mode = "packed blocks" if cfg.packing else "one document per row"
    info = (
        f"{len(train_files)} file(s) in {train_dir}: {blocks.meta['n_docs']} documents, {blocks.n_tokens} tokens, "
        f"{blocks.n_rows} rows of <= {cfg.max_tokens} tokens ({mode}); cache {blocks.path}"
    )

    def counts() -> tuple[Any, bool, str]:
        return count_tokens(blocks.tokens, len(tokenizer)), True, f"{blocks.n_tokens:,} training tokens"

    return Data(train, evals.get("valid"), evals.get("test"), spec, info, counts)


def _check_train_size(blocks: Blocks, batch_size: int, world_size: int, what: str) -> None:
    need_rows = batch_size * world_size
    if blocks.packing and blocks.n_tokens < need_rows * blocks.max_tokens:
        raise DataError(
            f"{what}: {blocks.n_tokens} tokens, fewer than one global micro-batch needs: --batch-size "
            f"{batch_size} x {world_size} process(es) x --max-tokens {blocks.max_tokens} = "
            f"{need_rows * blocks.max_tokens} tokens. Add documents or lower --batch-size / --max-tokens."
        )
    if not blocks.packing and blocks.n_rows < need_rows:
        raise DataError(
            f"{what}: {blocks.n_rows} rows (documents split at --max-tokens {blocks.max_tokens}), fewer than one "
            f"global micro-batch needs: --batch-size {batch_size} x {world_size} process(es) = {need_rows}. "
            "Add documents or lower --batch-size."
        )


def _check_eval_size(blocks: Blocks, world_size: int, what: str, fix: str) -> None:
    if blocks.n_rows < world_size:
        raise DataError(
            f"{what}: {blocks.n_rows} rows of <= {blocks.max_tokens} tokens ({blocks.n_tokens} tokens), fewer "
            f"than the {world_size} processes that each evaluate a share; {fix}"
        )


def _stream_data(cfg, tokenizer, spec, share: RankShare) -> Data:
    name = cfg.dataset_name or DEFAULT_DATASET
    ds = open_stream(name, cfg.dataset_config, cfg.dataset_split, cfg.text_field)
    valid_docs, test_docs, eval_end = take_eval(ds, cfg.eval_samples, cfg.text_field, cfg.min_text_length)
    encoder, world_size = Encoder(tokenizer), share.world_size
    n_streams = cfg.data_streams or default_streams(world_size, cfg.num_workers)

    def make_reader(stream: int, n_streams: int) -> StreamReader:
        plan = StreamPlan(
            n_shards=ds.num_shards,
            n_streams=n_streams,
            eval_end=eval_end,
            text_field=cfg.text_field,
            min_chars=cfg.min_text_length,
            buffer_size=max(1, cfg.buffer_size),
            seed=cfg.seed,
            max_tokens=cfg.max_tokens,
            packing=cfg.packing,
        )
        return StreamReader(ds, plan, stream, encoder)

    train = StreamBatches(
        make_reader, n_streams, spec, share, cfg.num_workers, (_source_id(cfg, name), cfg.seed)
    )
    evals = {}
    for split, docs, tag in (("valid", valid_docs, VALID_TAG), ("test", test_docs, TEST_TAG)):
        if docs:
            blocks = pack_documents(docs, encoder, cfg.max_tokens, cfg.packing)
            _check_eval_size(
                blocks,
                world_size,
                f"the stream's {split} split ({len(docs)} documents)",
                "raise --eval-samples",
            )
            evals[split] = EvalBatches(blocks, spec, cfg.seed, tag, share)
    by_shard = ds.num_shards >= n_streams
    layout = (
        "whole shards per stream" if by_shard else "every stream reads all shards, keeps 1 in S documents"
    )
    if not by_shard and n_streams > 1:
        logger.warning(
            "%s has %d shard(s) for %d logical streams: %s", name, ds.num_shards, n_streams, layout
        )
    info = (
        f"stream {name} (config {cfg.dataset_config}, split {cfg.dataset_split}): {ds.num_shards} shard(s), "
        f"{n_streams} logical streams ({len(train.local)} on this process), {layout}; {len(valid_docs)} valid / "
        f"{len(test_docs)} test documents taken before shuffling; shuffle chunks of {max(1, cfg.buffer_size)} "
        "documents per stream"
    )

    def counts() -> tuple[Any, bool, str]:
        # About STREAM_DOCS documents per rank, the first of each of its logical streams in equal parts.
        per_stream = max(1, STREAM_DOCS // len(train.local))
        docs = [doc for s in train.local for doc in train.readers[s].first_documents(per_stream)]
        ids, _, _ = encoder.encode(docs)
        what = f"the first {per_stream} training documents of each of {n_streams} logical stream(s)"
        return count_tokens(ids, len(tokenizer)), False, what

    return Data(train, evals.get("valid"), evals.get("test"), spec, info, counts)


def _source_id(cfg: Any, name: str) -> str:
    return f"{name}|{cfg.dataset_config}|{cfg.dataset_split}|{cfg.text_field}|{cfg.min_text_length}|{cfg.eval_samples}"
