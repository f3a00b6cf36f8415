"""CUDA checks, run by `pytest -m gpu` and benchmarks/gpu_suite.sh: bf16 autocast parity with HF, sdpa/flex/eager
agreement with gradients, the compiled model, host syncs per step, DeepSpeed ZeRO-2 on one GPU, export.

Skipped where there is no CUDA device: each one needs the GPU kernels it checks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mpnet_dist.model import to_hf
from mpnet_dist.step import StepSettings, train_step
from tests import corpus
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    PAD,
    finish,
    prepared_step,
    random_batch,
    start,
    step_micro_batches,
    tiny_args,
    tiny_model,
    train,
    train_losses,
    train_state,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
tiny_corpus = corpus.tiny_corpus
CUDA = torch.device("cuda")
BF16_TOL = 0.05  # relative to the largest logit: bf16 keeps 8 bits of mantissa


def _padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids, _ = random_batch(3, 14, 4)
    ids = ids[:, :14].clone()
    ids[1, 10:] = PAD
    return ids.to(CUDA), (ids != PAD).long().to(CUDA)


def test_bf16_autocast_matches_hf_and_fp32():
    model = tiny_model().to(CUDA)
    hf = to_hf(model.cpu()).to(CUDA)
    model.to(CUDA)
    ids, mask = _padded_ids()
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = model.mlm_logits(ids, mask)
            theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    keep = mask.bool()
    assert (ours.float() - reference)[keep].abs().max().item() < BF16_TOL * scale
    assert (ours.float() - theirs.float())[keep].abs().max().item() < BF16_TOL * scale


@pytest.mark.parametrize("impl", ["eager", "flex"])
def test_attention_kernels_agree_with_sdpa_on_cuda(impl):
    """fp32, dropout 0: outputs and every gradient within 1e-5 of SDPA (flex: the fused CUDA kernel)."""
    results = {}
    for name in ("sdpa", impl):
        # head dim 32: FlexAttention's CUDA kernels want head dims of at least 16
        model = (
            tiny_model(encoder_embed_dim=64, encoder_ffn_dim=128, encoder_attention_heads=2).to(CUDA).train()
        )
        model.config.attn_impl = name
        input_ids, positions = (t.to(CUDA) for t in random_batch(3, 14, 4))
        padding = torch.zeros_like(input_ids, dtype=torch.bool)
        padding[2, :3] = True
        outputs = (model(input_ids, positions, 4), model(input_ids, positions, 4, padding))
        sum(out.square().mean() for out in outputs).backward()
        results[name] = [out.detach() for out in outputs] + [p.grad for p in model.parameters()]
    for a, b in zip(results["sdpa"], results[impl], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_compiled_training_matches_eager_on_cuda(tiny_corpus, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = (*NO_DROPOUT, "--mixed-precision", "no", "--total-updates", "4", "--eval-interval-steps", "0")
    assert train(tiny_args(tiny_corpus, eager, *common)) == 0
    assert train(tiny_args(tiny_corpus, compiled, *common, "--compile")) == 0
    a, b = train_losses(eager), train_losses(compiled)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4


def test_one_device_sync_per_step_that_does_not_log():
    """torch's sync debug mode reports every synchronizing CUDA call made during the step."""
    accelerator, model, optimizer = prepared_step(update_freq=2, cpu=False)
    assert accelerator.device.type == "cuda"
    settings = StepSettings(lr=0.01, clip_grad_norm=1.0, read_grad_norm=False)
    train_step(accelerator, model, optimizer, step_micro_batches(2), settings)  # optimizer state built
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(accelerator, model, optimizer, step_micro_batches(2, seed=5), settings)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs


def test_deepspeed_zero2_on_one_gpu_trains_and_exports(tiny_corpus, tmp_path):
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    args = tiny_args(tiny_corpus, run_dir, "--export-hf-dir", str(hf_dir))
    log = tmp_path / "zero2.log"
    finish(start(CONFIGS / "deepspeed_zero2.yaml", args, "--num_processes", "1", "--main_process_port", "0",
                 log=log), log)  # fmt: skip
    state = train_state(run_dir)
    assert (state["distributed_type"], state["zero_stage"]) == ("DistributedType.DEEPSPEED", 2)
    assert (hf_dir / "model.safetensors").is_file()
    assert all(v == v for v in train_losses(run_dir).values())  # finite (NaN != NaN)
