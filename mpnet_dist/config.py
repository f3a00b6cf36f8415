"""Training configuration: one dataclass, the reference trainer's flag names, YAML recipes, CLI overrides.

Precedence is command line > YAML (`--config FILE`) > dataclass default. YAML keys are the flag names
(dashes or underscores). Unknown keys and values of the wrong type are errors that name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mpnet_dist import flags
from mpnet_dist.config_checks import DEEPSPEED_OVERRIDES_ENV, config_problems, flag
from mpnet_dist.data.cache import CACHE_ENV, DEFAULT_CACHE_DIR
from mpnet_dist.errors import ConfigError


def _opt(default: Any, help: str, *aliases: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices})


@dataclass
class TrainConfig:
    # --- model (reference names) ---
    encoder_layers: int = _opt(12, "Transformer layers.")
    encoder_embed_dim: int = _opt(768, "Hidden size.")
    encoder_ffn_dim: int = _opt(3072, "Feed-forward inner size.")
    encoder_attention_heads: int = _opt(12, "Attention heads.")
    dropout: float = _opt(0.1, "Dropout on embeddings, attention output and FFN output.")
    attention_dropout: float = _opt(0.1, "Dropout on attention probabilities.")
    activation_dropout: float = _opt(0.1, "Dropout after the FFN activation.")
    activation_fn: str = _opt(
        "gelu", "FFN activation.", "-activation", choices=("gelu", "relu", "silu", "gelu_tanh")
    )
    normalize_before: bool = _opt(False, "Pre-LN layers (not exportable to Hugging Face MPNet).", "-prenorm")
    max_positions: int | None = _opt(None, "Learned position table size (default: --max-tokens).")
    relative_attention_num_buckets: int | None = _opt(
        None, "Relative-position buckets (default 32; HF MPNet only supports 32).", "-num_buckets"
    )
    relative_attention_max_distance: int | None = _opt(
        None, "Relative-position max distance (default 128; HF MPNet only supports 128)."
    )
    attn_impl: str = _opt(
        "sdpa",
        "Attention implementation: sdpa, eager, or flex (FlexAttention; needs --attention-dropout 0, trains "
        "fused on CUDA only).",
        choices=("sdpa", "eager", "flex"),
    )
    # --- tokenizer and data ---
    tokenizer_name: str = _opt(
        "microsoft/mpnet-base",
        "HF tokenizer name or folder; 'builtin' = WordPiece trained on the offline corpus.",
    )
    max_tokens: int = _opt(512, "Tokens per sequence (block length), specials included.")
    train_dir: str | None = _opt(None, "Directory of training files (.txt, .jsonl, optionally .gz).")
    valid_file: str | None = _opt(None, "Validation file.")
    test_file: str | None = _opt(None, "Test file.")
    dataset_name: str | None = _opt(
        None,
        "HF dataset to stream (default HuggingFaceFW/fineweb-edu when no files are given); "
        "'builtin' = the offline standard-library docstring corpus.",
    )
    dataset_config: str | None = _opt(None, "HF dataset configuration name.")
    dataset_split: str = _opt("train", "HF dataset split to stream.")
    text_field: str = _opt("text", "Field holding the text in JSON lines and HF datasets.")
    buffer_size: int = _opt(10000, "Streaming shuffle buffer size (documents, per logical stream).")
    data_streams: int | None = _opt(
        None,
        "Streaming: logical streams the data is split into, fixed for the whole run (a resume uses the "
        "checkpoint's); the process count must divide it (default: lcm(12, processes x max(1, --num-workers))).",
    )
    eval_samples: int = _opt(500, "Streaming: documents taken for validation and for test, each.")
    min_text_length: int = _opt(64, "Streaming: drop documents shorter than this many characters.")
    packing: bool = _opt(
        True, "Pack documents into full blocks (default); --no-packing = one document per row."
    )
    pred_prob: float = _opt(0.15, "Fraction of tokens predicted.")
    rand_prob: float = _opt(0.10, "Fraction of predicted tokens replaced by a random token.")
    keep_prob: float = _opt(0.10, "Fraction of predicted tokens left unchanged.")
    whole_word_mask: bool = _opt(True, "Permute whole words (uses the fast tokenizer's word ids).")
    data_cache_dir: str | None = _opt(
        None, f"Where tokenized block caches go (default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR})."
    )
    num_workers: int = _opt(0, "DataLoader worker processes per rank.")
    prefetch_steps: int = _opt(
        1,
        "Optimizer steps of micro-batches built ahead in a background thread (on CUDA also pinned and copied "
        "to the GPU) while the current step runs; 0: build them in the step.",
    )
    # --- optimization ---
    total_updates: int = _opt(10000, "Optimizer steps to train.")
    warmup_updates: int | None = _opt(
        None, "Linear warmup steps (default 10% of --total-updates).", "-warmup_steps"
    )
    batch_size: int = _opt(16, "Sequences per micro-batch per process.")
    update_freq: int = _opt(8, "Micro-batches accumulated per optimizer step.", "-gc_steps")
    global_batch_size: int | None = _opt(
        None,
        "Sequences per optimizer step, all processes: sets --update-freq to it / (--batch-size x processes), "
        "so a run resumed on another process count (a requeued job with fewer nodes) keeps its batch.",
    )
    lr: float = _opt(6e-4, "Peak learning rate.")
    end_learning_rate: float = _opt(0.0, "Learning rate at the end of the polynomial decay.", "-end_lr")
    power: float = _opt(1.0, "Polynomial decay power.")
    beta1: float = _opt(0.9, "AdamW beta1.")
    beta2: float = _opt(0.98, "AdamW beta2.")
    adam_eps: float = _opt(1e-6, "AdamW epsilon.")
    weight_decay: float = _opt(0.01, "Weight decay (not applied to biases and norms).", "-wd")
    clip_grad_norm: float = _opt(1.0, "Gradient clipping max norm (0 disables).", "-grad_clip")
    mixed_precision: str | None = _opt(
        None, "no, bf16 or fp16 (default: bf16 on CUDA, no on CPU).", choices=("no", "bf16", "fp16")
    )
    gradient_checkpointing: bool = _opt(False, "Recompute layer activations in backward to save memory.")
    compile: bool = _opt(
        False,
        "torch.compile the whole model (forward and backward); the first step includes the compile time.",
    )
    compile_backend: str = _opt(
        "inductor",
        "torch.compile backend for --compile: inductor (generates fused kernels), or aot_eager / eager to tell "
        "a compiler problem from a model one (graphs captured, no code generated).",
        choices=("inductor", "aot_eager", "eager"),
    )
    seed: int = _opt(12345, "Random seed (model init, data order, masks).")
    # --- evaluation, checkpoints, logging ---
    eval_interval_steps: int | None = _opt(
        None,
        "Validate every N steps (default --checkpoint-interval if > 0, else 5000; <= 0: only at the end).",
    )
    checkpoint_dir: str = _opt("./checkpoints", "Run directory: checkpoints, config.yaml, metrics.jsonl.")
    checkpoint_interval: int = _opt(
        -1, "Save step-N checkpoints every N steps (-1: only best and final).", "--save_steps", "--save-steps"
    )
    keep_checkpoints: int = _opt(-1, "Keep the newest N interval checkpoints (-1 keeps all).")
    resume: bool = _opt(
        False, "Resume from the newest complete checkpoint in --checkpoint-dir (none: start fresh)."
    )
    resume_checkpoint: str | None = _opt(None, "Resume from this checkpoint folder.")
    overwrite: bool = _opt(
        False,
        "Start a new run in a --checkpoint-dir that holds an earlier one: first delete that run's checkpoints, "
        "metrics.jsonl and config.yaml (nothing else in the folder). Without it such a folder is refused.",
    )
    trust_checkpoint: bool = _opt(False, "Allow loading pickled (non weights-only) checkpoint files.")
    hf_model_path: str | None = _opt(None, "Initialize weights from a Hugging Face MPNet folder.")
    export_hf_dir: str | None = _opt(
        None, "At the end of training, export a verified HF MPNetForMaskedLM folder here."
    )
    save_optimizer_state: bool = _opt(False, "Accepted for compatibility: optimizer state is always saved.")
    logging_steps: int = _opt(25, "Log a training line every N steps.", "--logging_steps")
    tensorboard_log_dir: str | None = _opt(None, "TensorBoard log directory.", "-log_dir")
    wandb: bool = _opt(False, "Log to Weights & Biases.")
    wandb_project: str = _opt("annotated-mpnet", "W&B project.")
    wandb_name: str | None = _opt(None, "W&B run name.")
    wandb_id: str | None = _opt(None, "W&B run id (resume='allow').")
    wandb_watch: bool = _opt(False, "wandb.watch the model (gradients every 100 steps).")
    plot_curves: bool = _opt(
        True, "Redraw <checkpoint-dir>/curves.png after every evaluation (rank 0; a failure only warns)."
    )
    fill_mask_demo: int = _opt(
        0, "At the end, print top-3 fill-mask predictions for N held-out validation sentences (0: none)."
    )
    dist_timeout_s: int | None = _opt(
        None,
        "Timeout of every collective, in seconds (default $MPNET_DIST_TIMEOUT_S, else 1800); it must exceed the "
        "longest legitimate wait, e.g. rank 0 writing a checkpoint or verifying the export while the others wait.",
    )
    deepspeed_overrides: str | None = _opt(
        None,
        "JSON object merged into the DeepSpeed config before prepare(), for knobs the Accelerate YAML cannot "
        'express, e.g. \'{"zero_optimization": {"stage3_param_persistence_threshold": 0}}\' '
        "(default $MPNET_DIST_DEEPSPEED_OVERRIDES).",
    )
    max_nonfinite_skips: int = _opt(
        0, "Consecutive steps with a NaN/Inf loss to skip before stopping (0: stop at the first)."
    )
    debug: bool = _opt(False, "Debug-level logging, and full tracebacks for user errors.")
    # --- several nodes (README "Several nodes") ---
    startup_timeout_s: float = _opt(
        60.0, "Multi-node: seconds every node's training processes may take to report in at start."
    )
    node_timeout_s: float = _opt(
        30.0, "Multi-node: a node silent this long (heartbeat) is lost and the others stop (0: no heartbeat)."
    )

    def __post_init__(self) -> None:
        self._fill_from_environment()
        self.validate()

    def _fill_from_environment(self) -> None:
        """Settings also read from environment variables: unset here -> the variable -> the default.

        Resolved now, so the config saved with the run (config.yaml, train_state.json) holds the value used.
        """
        for name, (variable, default) in ENV_DEFAULTS.items():
            if getattr(self, name) is not None:
                continue
            raw = os.environ.get(variable)
            try:
                setattr(self, name, _parse_value(name, raw) if raw else default)
            except ConfigError as err:
                raise ConfigError(f"${variable} (sets {flag(name)}): {err}") from None

    # Derived values are methods, not fields, so a saved config never carries stale copies.
    def resolved_max_positions(self) -> int:
        return self.max_positions if self.max_positions is not None else self.max_tokens

    def resolved_warmup(self) -> int:
        return self.warmup_updates if self.warmup_updates is not None else round(0.1 * self.total_updates)

    def resolved_eval_interval(self) -> int:
        if self.eval_interval_steps is None:
            return self.checkpoint_interval if self.checkpoint_interval > 0 else 5000
        return self.eval_interval_steps if self.eval_interval_steps > 0 else self.total_updates

    def validate(self) -> None:
        """Every problem with the values at once, in one ConfigError naming each flag (config_checks.py)."""
        if self.resume_checkpoint and not self.resume:
            self.resume = True  # naming a checkpoint is an unambiguous request to resume
        found = config_problems(self)
        if found:
            raise ConfigError("; ".join(found))

    def set_update_freq_for(self, world_size: int) -> None:
        """--global-batch-size: the --update-freq that keeps it on `world_size` processes (a ConfigError if none)."""
        if self.global_batch_size is None:
            return
        per_micro_batch = self.batch_size * world_size
        if self.global_batch_size % per_micro_batch:
            raise ConfigError(
                f"{flag('global_batch_size')} {self.global_batch_size} is not a multiple of {flag('batch_size')} "
                f"{self.batch_size} x {world_size} process(es) = {per_micro_batch}: pick a --batch-size that, times "
                f"the process count, divides it"
            )
        self.update_freq = self.global_batch_size // per_micro_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}
# field -> (environment variable that sets it when neither the command line nor the recipe does, default)
ENV_DEFAULTS: dict[str, tuple[str, Any]] = {
    "data_cache_dir": (CACHE_ENV, DEFAULT_CACHE_DIR),
    "dist_timeout_s": ("MPNET_DIST_TIMEOUT_S", 1800),
    "deepspeed_overrides": (DEEPSPEED_OVERRIDES_ENV, None),
}


def _parse_value(name: str, raw: Any) -> Any:
    """Coerce a YAML or CLI value to the field's type; raise ConfigError naming the flag."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{flag(name)} cannot be empty")
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if base == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        value = str(raw)
        if value == "" and optional:
            return None  # the reference treats --dataset-name "" as unset
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)}: expected {base}, got {raw!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{flag(name)}: {value!r} is not one of {', '.join(choices)}")
    return value


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    hint = f" (did you mean {flag(close[0])}?)" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe: a flat mapping of flag names to values (yaml.safe_load: no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    except yaml.YAMLError as err:  # its text names "<unicode string>", never the file
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"--config {path}{where}: not valid YAML ({problem}); fix the recipe there"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    out = {}
    for key, raw in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == "config":
            raise ConfigError(f"--config {path}: recipes cannot include other recipes ('config' key)")
        if name not in FIELDS:
            raise ConfigError(f"--config {path}: {_unknown(str(key))}")
        try:
            out[name] = _parse_value(name, raw)
        except ConfigError as err:
            raise ConfigError(f"--config {path}: {err}") from None
    return out


def build_parser(prog: str = "mpnet-dist train") -> argparse.ArgumentParser:
    return flags.build_parser(fields(TrainConfig), prog)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """CLI > YAML > defaults. Raises ConfigError on unknown keys or bad values."""
    parser = build_parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    if "config" in args:
        values.update(load_yaml(args.pop("config")))
    for name, raw in args.items():
        values[name] = _parse_value(name, raw)
    return TrainConfig(**values)


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
