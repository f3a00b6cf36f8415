"""Training-step throughput: our two-stream MPNet step against HF MPNetForMaskedLM, interleaved.

    OMP_NUM_THREADS=2 python -m benchmarks.train_throughput --layers 4 --hidden 256 --heads 4 --ffn 1024 \
        --seq-len 128 --batch 16 [--precision fp32|bf16] [--device cpu|cuda] [--variants ours,ours-eager,hf]

Variants (all built with the same sizes, same AdamW settings, clip 1.0, lr constant):
  ours[-sdpa|-eager]  mpnet_dist.step.train_step: two-stream forward over L+2p rows, summed CE on the
                      p predicted tokens, backward, clip, AdamW; batches from make_mpnet_batch (packed)
  hf                  transformers.MPNetForMaskedLM on the same L tokens per row, the same predicted
                      positions as labels (-100 elsewhere); HF runs its LM head on all L positions
  before[-sdpa|...]   ours, with mpnet_dist/model, loss.py and step.py as of git revision --before
  ours-flex           --attn-impl flex (FlexAttention; needs --attention-dropout 0)
  <variant>+fused, <variant>+foreach   the same with torch.optim.AdamW(fused=True / foreach=True)
  <variant>+compile   the model torch.compile'd in place as --compile does (mpnet_dist.compilation); the
                      warm-up line reports the compile time separately from the timed steps
Repetitions alternate the variants (rotating the order) so shared-machine load hits all of them alike;
figures are medians over repetitions. tokens/s counts the L input tokens per row (no padding: packed).
Peak memory comes from one fresh child process per variant: CUDA max_memory_allocated, or on CPU the
peak RSS (VmHWM in /proc/self/status) minus the RSS after imports, before the model is built. Not
getrusage's ru_maxrss: Linux carries it over exec from the parent, whose models would inflate it.
MFU: FLOP formula in benchmarks/step_flops.py; CPU peak = best GEMM rate measured during the run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import transformers
from accelerate import Accelerator

from benchmarks import before_revision, step_flops, step_profile
from mpnet_dist.compilation import compile_model
from mpnet_dist.data.batch import MaskingSpec, count_predictions, make_mpnet_batch
from mpnet_dist.host_memory import keep_freed_memory

LR, CLIP, POOL = 1e-4, 1.0, 4  # POOL distinct batches cycled, so no step sees a cached input


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30527)
    p.add_argument("--seq-len", type=int, default=128, help="L, tokens per row")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout, both models")
    p.add_argument(
        "--attention-dropout", type=float, default=None, help="attention dropout if not --dropout (flex: 0)"
    )
    p.add_argument(
        "--activation-dropout",
        type=float,
        default=0.0,
        help="ours only: dropout after the FFN activation (HF MPNet has none; the trainer's default is 0.1)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--variants", default="ours,hf", help="comma list: ours, ours-eager, hf, before, ...")
    p.add_argument("--baseline", default="hf", help="variant the others are divided by")
    p.add_argument("--before", default=None, help="git revision for the 'before' variants")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per repetition")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the MFU denominator")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory children")
    p.add_argument("--profile", type=int, default=0, help="profile N steps of each variant, then exit")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of +compile variants")
    p.add_argument(
        "--host-allocator",
        choices=("default", "kept"),
        default="default",
        help="kept: mpnet_dist.host_memory.keep_freed_memory() first, as the trainer does on CPU (process-wide: "
        "it applies to every variant of the run; compare two runs)",
    )
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_tokens(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows in MPNet's special-id layout (<s>=0, <pad>=1, </s>=2, <mask>=vocab-1), ~1.4 tokens a word."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab - 1, size=(batch, length))
    tokens[rng.random((batch, length)) < 0.005] = 2  # document boundaries
    tokens[:, 0] = 0
    starts = (rng.random((batch, length)) < 0.7) | (tokens < 4)
    return tokens, starts


def build_batches(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """POOL pairs of (two-stream batch, HF MLM batch) over the same tokens and the same predicted positions."""
    spec = MaskingSpec(mask_id=args.vocab - 1, pad_id=1, special_ids=(0, 1, 2, 3), vocab_size=args.vocab)
    ours, hf = [], []
    for seed in range(POOL):
        tokens, starts = synthetic_tokens(args.batch, args.seq_len, args.vocab, seed)
        batch = make_mpnet_batch(tokens, starts, np.arange(args.batch) + seed * args.batch, spec)
        p, length = batch["targets"].shape[1], args.seq_len
        tail = batch["positions"][:, length - p : length]  # [B, p] original positions of the predictions
        input_ids = torch.from_numpy(tokens).clone()
        input_ids.scatter_(1, tail, batch["input_ids"][:, length : length + p])  # 80/10/10-corrupted
        labels = torch.full_like(input_ids, -100).scatter_(1, tail, batch["targets"])
        ours.append(batch)
        hf.append({"input_ids": input_ids, "labels": labels})
    return ours, hf


class Variant:
    """One model + optimizer + step function, prepared by the shared Accelerator."""

    def __init__(self, name: str, args: argparse.Namespace, accelerator: Accelerator) -> None:
        from mpnet_dist import step as step_module
        from mpnet_dist.model import config as config_module
        from mpnet_dist.model import hf as hf_module
        from mpnet_dist.model import mpnet as mpnet_module
        from mpnet_dist.optim import build_optimizer

        self.name, self.accelerator = name, accelerator
        base, *mods = name.split("+")  # +fused / +foreach: AdamW implementation; +compile: torch.compile
        if set(mods) - {"fused", "foreach", "compile"}:
            raise SystemExit(f"unknown variant modifier in {name!r}: use +fused, +foreach, +compile")
        adamw = next((m for m in mods if m in ("fused", "foreach")), None)
        kind, _, impl = base.partition("-")
        modules = {"config": config_module, "mpnet": mpnet_module, "step": step_module}
        if kind == "before":
            modules = before_revision.load(args.before)
        config = modules["config"].MPNetConfig(
            vocab_size=args.vocab,
            encoder_layers=args.layers,
            encoder_embed_dim=args.hidden,
            encoder_ffn_dim=args.ffn,
            encoder_attention_heads=args.heads,
            dropout=args.dropout,
            attention_dropout=args.dropout if args.attention_dropout is None else args.attention_dropout,
            activation_dropout=args.activation_dropout,
            max_positions=max(512, args.seq_len),
            attn_impl=impl or "sdpa",
        )
        torch.manual_seed(0)
        if kind == "hf":
            model = transformers.MPNetForMaskedLM(hf_module.hf_config(config))
        else:
            model = modules["mpnet"].MPNetForPretraining(config)
        self.params = sum(p.numel() for p in model.parameters())
        if "compile" in mods:  # in place, as the trainer does, before Accelerate wraps the model
            compile_model(model, accelerator.device, backend=args.compile_backend)
        opt_cfg = argparse.Namespace(
            weight_decay=0.01, lr=LR, warmup_updates=0, total_updates=1, end_learning_rate=LR, power=1.0,
            beta1=0.9, beta2=0.98, adam_eps=1e-6, resolved_warmup=lambda: 0,
        )  # fmt: skip
        optimizer = build_optimizer(model, opt_cfg)
        if adamw:  # same groups and hyper-parameters, other implementation
            groups = [{k: g[k] for k in ("params", "weight_decay")} for g in optimizer.param_groups]
            d = optimizer.defaults
            optimizer = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **{adamw: True})
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()
        self.train_step = modules["step"].train_step
        settings = getattr(modules["step"], "StepSettings", None)  # steps that do not log: no norm read
        self.step_settings = settings(LR, CLIP, read_grad_norm=False) if settings else None
        self.step: Callable[[dict], None] = self.hf_step if kind == "hf" else self.ours_step
        self.kind, self.first_steps_s = kind, 0.0

    def ours_step(self, batch: dict) -> None:
        if self.step_settings is None:  # a --before revision from before StepSettings
            self.train_step(self.accelerator, self.model, self.optimizer, [batch], LR, CLIP, False)
        else:
            self.train_step(self.accelerator, self.model, self.optimizer, [batch], self.step_settings)

    def hf_step(self, batch: dict) -> None:
        """What a user of HF would run: mean CE over labelled tokens, backward, clip, AdamW."""
        batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        loss = self.model(**batch).loss
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_steps(
    variant: Variant, batches: list[dict], n: int, first: int, device: torch.device
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step over n consecutive steps.

    CPU time counts only the time this process ran: on a shared CPU it moves much less with the load
    than wall time does (with one thread it is the compute time; with k threads up to k x wall).
    """
    step_flops.sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(n):
        variant.step(batches[(first + i) % len(batches)])
    step_flops.sync(device)
    return (time.perf_counter() - start) / n, (time.process_time() - cpu_start) / n


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    precision = "bf16" if args.precision == "bf16" else "no"
    return Accelerator(cpu=args.device == "cpu", mixed_precision=precision)


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # the kernel reports kB


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak memory of one variant over warm-up + a few steps, as JSON."""
    device = torch.device(args.device)
    base_rss = proc_status_bytes("VmRSS")  # after all imports
    accelerator = make_accelerator(args)
    variant = Variant(args.memory_child, args, accelerator)
    ours, hf = build_batches(args)
    batches = hf if variant.kind == "hf" else ours
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_steps(variant, batches, args.warmup + 2, 0, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = proc_status_bytes("VmHWM") - base_rss
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(args: argparse.Namespace, name: str, argv: list[str]) -> str:
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", *argv, "--memory-child", name]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return "failed: " + result.stderr.strip().splitlines()[-1]
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    return f"{peak / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_allocator == "kept" and not keep_freed_memory():
        raise SystemExit("--host-allocator kept needs glibc")
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if any(n.startswith("before") for n in names) and not args.before:
        raise SystemExit("--before REV is needed for the 'before' variants")
    print(f"command: {shlex.join(['python', '-m', 'benchmarks.train_throughput', *argv])}")
    print(f"machine: {step_flops.machine_line(device)}")
    print(f"start: {step_flops.load_line()}")
    accelerator = make_accelerator(args)
    variants = [Variant(n, args, accelerator) for n in names]
    ours_batches, hf_batches = build_batches(args)
    batches_of = {v.name: hf_batches if v.kind == "hf" else ours_batches for v in variants}
    p = count_predictions(args.seq_len, 0.15)
    flops = {
        v.name: step_flops.mlm_step_flops(
            args.batch, args.seq_len, args.layers, args.hidden, args.ffn, args.vocab
        )
        if v.kind == "hf"
        else step_flops.two_stream_step_flops(
            args.batch,
            args.seq_len,
            p,
            args.layers,
            args.hidden,
            args.ffn,
            args.vocab,
            v.kind == "before" and before_revision.full_last_layer(args.before),
        )
        for v in variants
    }
    for v in variants:
        start = time.perf_counter()
        run_steps(v, batches_of[v.name], args.warmup, 0, device)  # includes compilation for +compile
        v.first_steps_s = time.perf_counter() - start
        print(f"warm-up {v.name}: {args.warmup} step(s) in {v.first_steps_s:.1f} s", flush=True)
    for v in variants:  # again, untimed: a compiled variant may recompile after another variant compiled
        run_steps(v, batches_of[v.name], 1, 0, device)
    if args.profile:
        step_profile.profile(variants, batches_of, args.profile, device, run_steps)
        return
    gemm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # CPUs without AVX512-BF16/AMX run bf16 GEMMs ~100x slower than fp32: keep that probe short.
    gemm_size = 512 if gemm_dtype == torch.bfloat16 and device.type == "cpu" else 2048
    times: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    gemm: list[tuple[float, float]] = []
    for rep in range(args.repeats):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for v in order:
            times[v.name].append(run_steps(v, batches_of[v.name], args.steps, rep * args.steps, device))
        gemm.append(step_flops.gemm_flops_per_s(device, gemm_dtype, gemm_size))
        row = "  ".join(f"{n} {t[-1][0] * 1e3:.0f} ms ({t[-1][1] * 1e3:.0f} CPU)" for n, t in times.items())
        print(f"rep {rep}: {row}  | {step_flops.load_line()}", flush=True)
    peaks = (max(g[0] for g in gemm), max(g[1] for g in gemm))
    report(args, argv, variants, times, flops, peaks, p, device)


def report(args, argv, variants, times, flops, gemm_peaks, p, device) -> None:
    """Markdown table; wall figures first, then the same per CPU-second (the load-robust ones here)."""
    spec = args.peak_tflops * 1e12 if args.peak_tflops else step_flops.spec_peak_flops(device)
    peak_wall, peak_cpu = (spec, spec) if spec else gemm_peaks
    source = "--peak-tflops" if args.peak_tflops else "spec sheet" if spec else "best GEMM of the run"
    tokens = args.batch * args.seq_len
    print(f"end: {step_flops.load_line()}")
    print(
        f"\nsize: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, ffn {args.ffn}, vocab {args.vocab}; "
        f"B={args.batch}, L={args.seq_len}, p={p} (two-stream rows L+2p={args.seq_len + 2 * p}), "
        f"{args.precision}, dropout {args.dropout} (ours: activation dropout {args.activation_dropout}), {args.device}; {args.repeats} reps x {args.steps} steps"
    )
    print(
        f"peak for MFU ({source}): {peak_wall / 1e12:.3f} TFLOP/s wall, {peak_cpu / 1e12:.3f} TFLOP/s per "
        f"CPU-second; best {args.precision} GEMM this run {gemm_peaks[0] / 1e12:.3f} / {gemm_peaks[1] / 1e12:.3f}\n"
    )
    print(
        "| variant | params | step ms (median, min-max) | tokens/s | MFU | step CPU-ms (median, min-max) "
        "| tokens/CPU-s | MFU per CPU-s | model TFLOP/step | peak mem |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        wall = [t[0] for t in times[v.name]]
        cpu = [t[1] for t in times[v.name]]
        w, c = statistics.median(wall), statistics.median(cpu)
        mem = "-" if args.no_memory else peak_memory(args, v.name, argv)
        cpu_cells = (  # host CPU time says nothing about GPU work
            "| - | - | - "
            if device.type == "cuda"
            else f"| {c * 1e3:.0f} ({min(cpu) * 1e3:.0f}-{max(cpu) * 1e3:.0f}) | {tokens / c:,.0f} "
            f"| {flops[v.name] / c / peak_cpu:.1%} "
        )
        print(
            f"| {v.name} | {v.params / 1e6:.1f}M | {w * 1e3:.0f} ({min(wall) * 1e3:.0f}-{max(wall) * 1e3:.0f}) "
            f"| {tokens / w:,.0f} | {flops[v.name] / w / peak_wall:.1%} {cpu_cells}"
            f"| {flops[v.name] / 1e12:.4f} | {mem} |"
        )
    for v in variants:
        if "compile" in v.name.split("+")[1:]:
            print(
                f"compile: {v.name} warm-up ({args.warmup} step(s), compilation included) {v.first_steps_s:.1f} s"
            )
    base = args.baseline
    if base not in times:
        return
    print()
    for name in times:
        if name == base:
            continue
        for label, k in (("wall", 0), ("CPU", 1))[: 1 if device.type == "cuda" else 2]:
            ratios = [a[k] / b[k] for a, b in zip(times[name], times[base], strict=True)]
            medians = statistics.median(t[k] for t in times[name]) / statistics.median(
                t[k] for t in times[base]
            )
            target = "; target <= 1.30x" if base == "hf" else ""
            print(
                f"cost per token {name} / {base} ({label} time): {medians:.2f}x of the medians, "
                f"{statistics.median(ratios):.2f}x median of per-rep ratios "
                f"({', '.join(f'{r:.2f}' for r in ratios)}){target}"
            )


if __name__ == "__main__":
    main()
