"""Document sources: file formats, the built-in corpus, and bad input named by file, line or field."""

import gzip
import json

import pytest

from mpnet_dist.data import DataError, build_data, load_tokenizer
from mpnet_dist.data.corpus import materialize_builtin_corpus
from mpnet_dist.data.sources import list_train_files, open_stream, read_documents, take_eval
from tests.helpers import doc_text, make_cfg, write_docs


def test_plain_jsonl_and_gzip_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n   \nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "third", "n": 1}) + "\n\n" + json.dumps({"body": "  "}) + "\n"
    )
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("fourth\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "fifth"}) + "\n")
    (tmp_path / ".hidden").write_text("ignored\n")
    files = list_train_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.txt.gz", "d.jsonl.gz"]
    docs = [d for f in files for d in read_documents(f, "body")]
    assert docs == ["first doc", "second doc", "third", "fourth", "fifth"]


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", r"a\.txt: no text \(the file is empty or whitespace-only\)"),
        (b"  \n\t\n", r"a\.txt: no text"),
        (b"good line\nbad \xff\xfe line\n", r"a\.txt line 2: bytes that are not UTF-8 at column 5"),
    ],
)
def test_bad_text_files(tmp_path, content, pattern):
    (tmp_path / "a.txt").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        list(read_documents(tmp_path / "a.txt"))


def test_bad_json_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "id": 3}) + "\n")
    with pytest.raises(
        DataError, match=r"a\.jsonl line 2: no field 'text'; the fields there are \['content', 'id'\]"
    ):
        list(read_documents(path))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"a\.jsonl line 2: not valid JSON"):
        list(read_documents(path))


def test_missing_and_empty_paths(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such directory"):
        list_train_files(tmp_path / "nope")
    with pytest.raises(DataError, match="the directory holds no files"):
        list_train_files(tmp_path)
    write_docs(tmp_path / "train" / "a.txt", list(range(50)))
    cfg = make_cfg(
        train_dir=str(tmp_path / "train"),
        valid_file=str(tmp_path / "v.txt"),
        data_cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(DataError, match=r"--valid-file .*v\.txt: no such file"):
        build_data(cfg, tokenizer, 0, 1)


def test_too_small_for_one_batch_says_what_is_needed(tmp_path, tokenizer):
    write_docs(tmp_path / "train" / "a.txt", list(range(3)))
    cfg = make_cfg(
        train_dir=str(tmp_path / "train"), batch_size=4, max_tokens=32, data_cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(
        DataError,
        match=r"tokens, fewer than one global micro-batch needs: --batch-size 4 x 2 .* = 256 tokens",
    ):
        build_data(cfg, tokenizer, 0, 2)
    cfg.packing = False
    with pytest.raises(DataError, match=r"3 rows .* --batch-size 4 x 1 process\(es\) = 4"):
        build_data(cfg, tokenizer, 0, 1)


def test_builtin_corpus_is_large_deterministic_and_split(builtin_cache):
    corpus = materialize_builtin_corpus(builtin_cache)
    train = (corpus.train_dir / "train.txt").read_text().splitlines()
    valid, test = corpus.valid_file.read_text().splitlines(), corpus.test_file.read_text().splitlines()
    assert len(train) + len(valid) + len(test) > 5000
    assert sum(map(len, train)) > 1_000_000
    assert 50 < len(valid) < len(train) // 20 and 50 < len(test) < len(train) // 20
    assert not set(valid) & set(train) and not set(test) & set(train)
    assert materialize_builtin_corpus(builtin_cache) == corpus  # cached, not rebuilt


def test_quickstart_path_builtin_tokenizer_and_corpus(builtin_cache):
    tokenizer = load_tokenizer("builtin", builtin_cache)
    assert len(tokenizer) == 8192 and tokenizer.pad_token_id == 1 and tokenizer.mask_token_id == 8191
    assert tokenizer.tokenize("Return the value.") == ["return", "the", "value", "."]
    cfg = make_cfg(dataset_name="builtin", data_cache_dir=builtin_cache, max_tokens=128, batch_size=8)
    data = build_data(cfg, tokenizer, 0, 1)
    batch = next(data.train)
    assert batch["input_ids"].shape == (8, 128 + 2 * 19) and "padding_mask" not in batch
    assert data.valid is not None and data.test is not None and len(data.valid) > 5
    assert "documents" in data.source_info


def _jsonl_dataset(root, n_files, per_file, start=0):
    for f in range(n_files):
        ids = range(start + f * per_file, start + (f + 1) * per_file)
        write_docs(root / f"part{f}.jsonl", list(ids), "jsonl")
    return root


def test_stream_eval_comes_first_and_missing_field_is_named(tmp_path):
    root = _jsonl_dataset(tmp_path / "ds", 2, 10)
    ds = open_stream(str(root), None, "train", "text")
    valid, test, end = take_eval(ds, 3, "text", 1)
    assert valid == [doc_text(i) for i in range(3)] and test == [doc_text(i) for i in range(3, 6)]
    assert (end.shard, end.index) == (0, 6)
    with pytest.raises(DataError, match=r"no field 'body'; the fields there are \['id', 'text'\]"):
        open_stream(str(root), None, "train", "body")
    with pytest.raises(DataError, match="needs 40 for validation and test"):
        take_eval(ds, 20, "text", 1)


def test_unreachable_dataset_names_the_offline_alternatives(tmp_path):
    with pytest.raises(DataError, match="--dataset-name builtin"):
        open_stream("no-such-org/no-such-dataset", None, "train", "text")
