"""Tokenizer training, loading, validation and encoding (word starts from the fast tokenizer's word ids)."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mpnet_dist.data import DataError, check_vocab, load_tokenizer, tokenizer_main, train_tokenizer
from mpnet_dist.data.tokenizer import Encoder
from tests.helpers import doc_text, make_cfg, write_docs


def test_trained_tokenizer_has_mpnet_layout_and_reloads_offline(tokenizer, tmp_path):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    assert tokenizer.pad_token_id == 1
    ids = tokenizer("begin one end alpha").input_ids
    assert ids[0] == 0 and ids[-1] == 2
    assert type(tokenizer).__name__ == "MPNetTokenizer"
    assert any(t.startswith("##") for t in tokenizer.get_vocab()) or len(tokenizer) < 200


def test_training_is_deterministic_and_cli_writes_a_loadable_folder(tmp_path):
    files = [
        write_docs(tmp_path / "a.txt", list(range(80))),
        write_docs(tmp_path / "b.jsonl", list(range(80, 160)), "jsonl"),
    ]
    first = train_tokenizer(files, tmp_path / "t1", vocab_size=300)
    assert (
        tokenizer_main(
            ["--files", *map(str, files), "--vocab-size", "300", "--output-dir", str(tmp_path / "t2")]
        )
        == 0
    )
    a, b = AutoTokenizer.from_pretrained(first), AutoTokenizer.from_pretrained(tmp_path / "t2")
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 300


def test_load_errors_say_what_to_do(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="--tokenizer-name builtin"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    no_mask = tmp_path / "no_mask"
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>").save_pretrained(no_mask)
    with pytest.raises(DataError, match="no mask token.*add_special_tokens"):
        load_tokenizer(str(no_mask))
    with pytest.raises(DataError, match=f"has {len(tokenizer)} tokens.*trained with a 5000-token"):
        check_vocab(tokenizer, 5000)
    check_vocab(tokenizer, len(tokenizer))


def test_no_pad_token_is_refused(tokenizer, tmp_path):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_object=backend, mask_token="<mask>").save_pretrained(tmp_path / "t")
    with pytest.raises(DataError, match="no pad token"):
        load_tokenizer(str(tmp_path / "t"))


def test_wordpiece_word_starts(tokenizer):
    ids, starts, lengths = Encoder(tokenizer).encode(["begin one end alphabetagamma", "kappa"])
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert lengths.tolist() == [len(tokens) - 3, 3]
    expected = [not t.startswith("##") for t in tokens]  # specials and every word's first piece
    assert starts.tolist() == expected
    assert not all(expected)  # the test really has a multi-piece word


def _byte_level_bpe(texts: list[str], with_post_processor: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<mask>"], show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    if with_post_processor:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )


@pytest.mark.parametrize("with_post_processor", [True, False])
def test_byte_level_bpe_word_starts_and_separator(with_post_processor):
    tok = _byte_level_bpe([doc_text(i) for i in range(100)], with_post_processor)
    ids, starts, lengths = Encoder(tok).encode(["begin alphabetagamma river", "kappa"])
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    # Byte-level BPE marks a word's first piece with "Ġ"; specials are starts too.
    expected = [t.startswith("Ġ") or t in ("<s>", "</s>") for t in tokens]
    assert starts.tolist() == expected
    assert not all(expected)
    # Documents end with </s>: from the post-processor, or appended when the tokenizer adds nothing.
    ends = np.cumsum(lengths) - 1
    assert (ids[ends] == tok.eos_token_id).all()


def test_build_data_reads_special_ids_from_any_tokenizer(tmp_path):
    """A byte-level BPE tokenizer whose <pad> is 0 and <mask> 3: nothing assumes MPNet's ids."""
    from mpnet_dist.data import build_data

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    specials = ["<pad>", "<s>", "</s>", "<mask>"]
    backend.train_from_iterator(
        [doc_text(i) for i in range(100)],
        trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )
    write_docs(tmp_path / "train" / "a.txt", list(range(40)))
    cfg = make_cfg(
        train_dir=str(tmp_path / "train"), packing=False, max_tokens=64, data_cache_dir=str(tmp_path / "c")
    )
    data = build_data(cfg, tok, 0, 1)
    assert (data.spec.pad_id, data.spec.mask_id) == (0, 3) and set(data.spec.special_ids) == {0, 1, 2, 3}
    batch = next(data.train)
    assert "padding_mask" in batch  # documents differ in length: padded with id 0
    width = batch["input_ids"].shape[1] - 2 * batch["targets"].shape[1]
    assert torch.equal(batch["padding_mask"][:, :width], batch["input_ids"][:, :width] == 0)
    assert not set(batch["targets"].unique().tolist()) & {0, 1, 2, 3}
