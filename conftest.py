"""Test-session environment (applies to the tests and to the processes they launch)."""

import os

# 2 ranks on 2 cores: one thread each. Loopback-only gloo, DeepSpeed's CPU accelerator, no network lookups.
for key, value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "lo",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}.items():
    os.environ.setdefault(key, value)

# Shared fixtures for end-to-end tests (tiny corpus + tokenizer built once per session).
pytest_plugins = ["tests.corpus"]
