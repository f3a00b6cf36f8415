"""benchmarks/gpu_suite.sh on a CUDA-less host: its CPU fallback runs every kind of variant at a tiny shape."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_cpu_fallback_runs_every_variant(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the suite is the real measurement (minutes); run it by hand")
    log = tmp_path / "suite.log"
    env = {**os.environ, "GPU_SUITE_LOG": str(log)}
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-4000:] + done.stderr[-2000:]
    assert "no CUDA device: CPU fallback" in text
    for variant in ("ours-sdpa", "ours-eager", "ours-flex", "hf", "ours-sdpa+compile", "hf+compile"):
        row = re.search(rf"^\| {re.escape(variant)} \| [^|]+ \| [^|]+ \| ([\d,]+) \|", text, re.M)
        assert row and int(row.group(1).replace(",", "")) > 0, variant  # tokens/s
    assert "compile: ours-sdpa+compile warm-up" in text
    assert "cost per token ours-sdpa / hf" in text
