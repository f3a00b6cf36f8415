"""`mpnet-dist eval` and `fill-mask` on checkpoints and Hugging Face folders, and the sentence-transformers export.

A checkpoint runs through our model, its export through transformers' MPNetForMaskedLM: equal figures from
both are an independent check of the scoring (and of the export).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import warnings

import pytest
import torch

from mpnet_dist.evaluation import main as eval_main
from mpnet_dist.export import export_checkpoint
from mpnet_dist.fill_mask import main as fill_mask_main
from tests.helpers import assert_png_has_a_picture, tiny_args, train


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> dict:
    """A tiny run with training's curves and fill-mask demo on, and its export (sentence-transformers files
    are written by default)."""
    root = tmp_path_factory.mktemp("evaluation")
    args = tiny_args(tiny_corpus, root / "run", "--total-updates", "8", "--dropout", "0", "--plot-curves",
                     "--eval-interval-steps", "4", "--fill-mask-demo", "3")  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train(args) == 0
    export_checkpoint(root / "run" / "final", root / "hf")
    return {"run": root / "run", "hf": root / "hf", "text": tiny_corpus["test"], "stdout": printed.getvalue()}


def test_training_draws_curves_and_ends_with_the_fill_mask_demo(trained):
    assert_png_has_a_picture(trained["run"] / "curves.png")
    lines = trained["stdout"][trained["stdout"].index("fill-mask demo") :].splitlines()
    demo = [lines[0], *itertools.takewhile(lambda line: line.startswith("  "), lines[1:])]
    assert len(demo) == 1 + 2 * 3, demo  # a header, then each sentence and its top 3
    for sentence, predictions in zip(demo[1::2], demo[2::2], strict=True):
        assert "<mask>" in sentence and sentence.rstrip().endswith("]")
        assert len(predictions.split(" | ")) == 3


def run_eval(capsys, *args: object) -> tuple[int, dict | None, str]:
    code = eval_main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), captured.err


def test_checkpoint_and_its_hf_export_give_the_same_figures(trained, capsys):
    code, ours, summary = run_eval(
        capsys, trained["run"] / "final", "--text-file", trained["text"], "--seed", "3"
    )
    assert code == 0 and "masked LM" in summary and "two-stream" in summary
    code, theirs, _ = run_eval(capsys, trained["hf"], "--text-file", trained["text"], "--seed", "3")
    assert code == 0 and theirs["kind"] == "hf" and "two_stream_loss" not in theirs
    assert ours["predicted_tokens"] == theirs["predicted_tokens"] > 50
    assert ours["tokens"] == theirs["tokens"] and ours["max_tokens"] == theirs["max_tokens"] == 32
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["acc"] == pytest.approx(theirs["acc"], abs=1e-9)
    assert ours["perplexity"] == pytest.approx(torch.tensor(ours["loss"]).exp().item(), rel=1e-5)
    assert 0 < ours["two_stream_loss"] < 20 and ours["two_stream_predicted_tokens"] > 50


def test_masks_are_fixed_by_the_seed_and_max_docs_limits(trained, capsys):
    first = run_eval(capsys, trained["run"], "--text-file", trained["text"])[1]
    again = run_eval(capsys, trained["run"], "--text-file", trained["text"])[1]
    other = run_eval(capsys, trained["run"], "--text-file", trained["text"], "--seed", "1")[1]
    few = run_eval(capsys, trained["run"], "--text-file", trained["text"], "--max-docs", "3")[1]
    assert first["loss"] == again["loss"] and first["two_stream_loss"] == again["two_stream_loss"]
    assert other["loss"] != first["loss"]
    assert few["docs"] == 3 < first["docs"] and few["tokens"] < first["tokens"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["{tmp}/missing", "--text-file", "{text}"], "missing"),
        (["{tmp}", "--text-file", "{text}"], "Hugging Face"),
        (["{run}", "--text-file", "{tmp}/none.txt"], "none.txt"),
        (["{run}", "--text-file", "{tmp}/empty.txt"], "empty.txt"),
        (["{run}", "--text-file", "{text}", "--max-docs", "0"], "--max-docs"),
        (["{run}", "--text-file", "{text}", "--max-tokens", "4096"], "--max-tokens"),
    ],
)
def test_eval_bad_input_exits_2_with_one_line(trained, tmp_path, capsys, args, named):
    (tmp_path / "empty.txt").write_text("\n\n")
    values = {"tmp": tmp_path, "text": trained["text"], "run": trained["run"]}
    code, _, err = run_eval(capsys, *[a.format(**values) for a in args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mpnet-dist eval: error:"), err
    assert named in lines[0] and "Traceback" not in err


def test_fill_mask_checkpoint_and_export_agree(trained, capsys):
    text = "Return a new <mask> of the list."
    outputs = []
    for path in (trained["run"], trained["hf"]):
        assert fill_mask_main([str(path), text]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0][0] == text and outputs[0][1].startswith("  <mask> 1: ")
    tokens = [[part.split()[0] for part in out[1].split(": ", 1)[1].split(" | ")] for out in outputs]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3  # same top 3 from both implementations
    assert fill_mask_main([str(trained["run"]), "no mask here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "<mask>" in err[0]


def test_sentence_transformers_loads_the_export_without_weight_reports(trained, capfd, caplog):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import transformers

    folder = trained["hf"]
    assert {p.name for p in folder.iterdir()} >= {"modules.json", "sentence_bert_config.json", "1_Pooling"}
    sentences = ["Return the number of items.", "A short one."]
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sentence_transformers.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        embeddings = model.encode(sentences, convert_to_tensor=True)
    said = capfd.readouterr()
    reports = "\n".join([said.out, said.err, caplog.text, *(str(w.message) for w in caught)]).lower()
    for word in ("unexpected", "missing", "newly initialized", "not used", "no sentence-transformers model"):
        assert word not in reports, reports
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling"]
    # Independent: mean of transformers' MPNetModel hidden states over the real tokens.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    base = transformers.MPNetModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state  # [B, L, H]
    mask = batch["attention_mask"][..., None].float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)[1]
    assert not any(masked_lm[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_no_sentence_transformers_flag_writes_a_plain_folder(trained, tmp_path):
    from mpnet_dist.export import main as export_main

    assert export_main([str(trained["run"]), str(tmp_path / "plain"), "--no-sentence-transformers"]) == 0
    names = {p.name for p in (tmp_path / "plain").iterdir()}
    assert "config.json" in names and not names & {"modules.json", "sentence_bert_config.json", "1_Pooling"}
