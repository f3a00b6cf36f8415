"""--compile: one graph forward and backward, losses equal to eager in one process, under DDP and under
DeepSpeed ZeRO-2, compile time logged once, checkpoints and export without `_orig_mod`.

Inductor on 2 cores takes minutes, so only the single-process run generates code (in a module-scoped cache
directory); the DDP and ZeRO-2 runs compile with the aot_eager backend: the same Dynamo + AOTAutograd capture
of the forward and backward graphs inside the DDP / DeepSpeed wrappers, without code generation. (With
Inductor in both they matched eager within 3.8e-7 when measured by hand: BENCHMARKS.md, "Compilation".)
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from safetensors.torch import load_file
from torch._dynamo.backends.common import aot_autograd

from mpnet_dist.compilation import check_compile_supported, compile_model
from mpnet_dist.loss import prediction_loss
from tests import corpus
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    finish_all,
    random_batch,
    start,
    tiny_args,
    tiny_model,
    train,
    train_losses,
)

tiny_corpus = corpus.tiny_corpus
# Inductor fuses elementwise chains and may reorder fp32 sums. Measured max loss differences against the eager
# single process: 0 (Inductor, one process), 3.8e-7 (DDP and ZeRO-2, Inductor or aot_eager); the tolerance is
# the one DDP itself gets against one process (tests/test_distributed.py, DDP_LOSS_TOL).
COMPILED_LOSS_TOL = 1e-5


def test_model_is_one_graph_forward_and_backward():
    """Dropout on, packed and padded batches: each is one forward and one backward graph, no graph break."""
    graphs = {"forward": 0, "backward": 0}

    def counting(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind] += 1
            return make_boxed_func(graph_module.forward)

        return compiler

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train()
    compile_model(model, torch.device("cpu"), backend=aot_autograd(fw_compiler=counting("forward"),
                                                                    bw_compiler=counting("backward")))  # fmt: skip
    input_ids, positions = random_batch(3, 12, 4)
    for padding_mask in (None, input_ids == 1):
        logits = model(input_ids, positions, 4, padding_mask)
        prediction_loss(logits, input_ids[:, -4:])[0].backward()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert graphs == {"forward": 2, "backward": 2}  # packed, padded
    assert all(not name.startswith("_orig_mod") for name in model.state_dict())


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inductor"))
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # also inherited by the launched ranks
    yield path
    if saved is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def _args(corpus_paths, run_dir, *extra: str) -> list[str]:
    # batch 4 per forward everywhere (same compiled graph); 8 blocks per optimizer step everywhere
    return tiny_args(corpus_paths, run_dir, *NO_DROPOUT, "--total-updates", "3", "--eval-interval-steps", "0",
                     "--batch-size", "4", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def compiled_runs(tiny_corpus, inductor_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    runs = {name: root / name for name in ("eager", "single", "ddp", "zero2")}
    assert train(_args(tiny_corpus, runs["eager"], "--update-freq", "2")) == 0
    torch._dynamo.reset()
    assert train(_args(tiny_corpus, runs["single"], "--update-freq", "2", "--compile",
                       "--export-hf-dir", str(root / "hf"))) == 0  # fmt: skip
    port0 = ("--main_process_port", "0")
    launches = [
        (start(CONFIGS / config, _args(tiny_corpus, runs[name], "--update-freq", "1", "--compile",
                                       "--compile-backend", "aot_eager"), *port0, log=root / f"{name}.log"),
         root / f"{name}.log")
        for name, config in (("ddp", "cpu_2proc.yaml"), ("zero2", "deepspeed_zero2.yaml"))
    ]  # fmt: skip
    finish_all(launches)
    return runs, root


def _compile_lines(log: str) -> list[str]:
    return re.findall(r"torch\.compile: .*", log)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "ddp", "zero2"])
def test_compiled_losses_equal_eager(compiled_runs, name):
    runs, root = compiled_runs
    eager, compiled = train_losses(runs["eager"]), train_losses(runs[name])
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    diff = max(abs(compiled[s] - eager[s]) for s in eager)
    print(f"{name} compiled vs eager: max loss diff {diff:.2e}")
    assert diff < COMPILED_LOSS_TOL
    if name != "single":
        log = (root / f"{name}.log").read_text(errors="replace")
        lines = _compile_lines(log)
        assert len(lines) == 1, lines  # once (rank 0 logs; any rank would warn about graph breaks)
        assert ", 1 graph(s), 0 graph breaks" in lines[0], lines


@pytest.mark.slow
def test_compiled_checkpoint_and_export_have_plain_keys(compiled_runs, caplog):
    runs, root = compiled_runs
    for state_dict in (load_file(str(runs["single"] / "final" / "model.safetensors")),
                       load_file(str(root / "hf" / "model.safetensors"))):  # fmt: skip
        assert state_dict and not [k for k in state_dict if "_orig_mod" in k]
    eager = load_file(str(runs["eager"] / "final" / "model.safetensors"))
    assert eager.keys() == load_file(str(runs["single"] / "final" / "model.safetensors")).keys()


def test_compile_with_zero3_is_refused_with_the_way_forward():
    check_compile_supported(2)
    with pytest.raises(ValueError, match="deepspeed_zero2.yaml"):
        check_compile_supported(3)
