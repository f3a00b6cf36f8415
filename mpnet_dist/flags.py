"""The command line of `mpnet-dist train`: TrainConfig's fields as argparse flags, in the groups of README.md's
flag table, each with its help text and its default shown once (command.HelpFormatter's convention)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable

from mpnet_dist.command import Parser

# The groups of `train --help`, in the order of README.md's flag table. Flags the reference trainer
# (annotated-mpnet) does not have are in the last two groups; a field listed nowhere lands in the last one.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("encoder_layers", "encoder_embed_dim", "encoder_ffn_dim", "encoder_attention_heads", "dropout",
              "attention_dropout", "activation_dropout", "activation_fn", "normalize_before", "max_positions",
              "relative_attention_num_buckets", "relative_attention_max_distance"),
    "data": ("tokenizer_name", "max_tokens", "train_dir", "valid_file", "test_file", "dataset_name",
             "text_field", "buffer_size", "eval_samples", "min_text_length", "num_workers"),
    "optimization": ("total_updates", "warmup_updates", "batch_size", "update_freq", "lr", "end_learning_rate",
                     "power", "beta1", "beta2", "adam_eps", "weight_decay", "clip_grad_norm",
                     "gradient_checkpointing", "compile", "seed"),
    "checkpoints and logging": ("checkpoint_dir", "checkpoint_interval", "keep_checkpoints", "eval_interval_steps",
                                "resume", "resume_checkpoint", "trust_checkpoint", "hf_model_path",
                                "save_optimizer_state", "logging_steps", "tensorboard_log_dir", "wandb",
                                "wandb_project", "wandb_name", "wandb_id", "wandb_watch", "debug"),
    "distributed (added by mpnet-dist)": ("mixed_precision", "dist_timeout_s", "deepspeed_overrides",
                                          "global_batch_size", "data_streams", "startup_timeout_s",
                                          "node_timeout_s"),
    "added by mpnet-dist": ("config", "dataset_config", "dataset_split", "packing", "pred_prob", "rand_prob",
                            "keep_prob", "whole_word_mask", "data_cache_dir", "attn_impl", "export_hf_dir",
                            "max_nonfinite_skips", "overwrite"),
}  # fmt: skip


def build_parser(config_fields: Iterable[dataclasses.Field], prog: str) -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: only flags actually typed appear in the namespace, so they alone override YAML.
    parser = Parser(
        prog=prog,
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        description="Pretrain MPNet (two-stream masked and permuted LM). Flags keep annotated-mpnet's names; a "
        "YAML recipe (--config) uses the same names; the command line wins over the recipe.",
        epilog="Several processes: mpnet-dist launch --config_file launch_configs/accelerate/CONFIG.yaml "
        "-m mpnet_dist.train FLAGS (README.md, 'Scaling out').",
        argument_default=argparse.SUPPRESS,
    )
    groups = {name: parser.add_argument_group(name) for name in FLAG_GROUPS}
    where = {field: groups[name] for name, members in FLAG_GROUPS.items() for field in members}
    fallback = groups["added by mpnet-dist"]
    where.get("config", fallback).add_argument(
        "--config", metavar="FILE", help="YAML recipe whose keys are flag names."
    )
    for f in config_fields:
        names = ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
        help_text = f.metadata["help"]
        if "default" not in help_text and f.default is not None:  # a default the help explains stays alone
            shown = "off" if f.default is False else "on" if f.default is True else f.default
            help_text += f" (default: {shown})"
        group = where.get(f.name, fallback)
        if f.type in ("bool",) or f.type is bool:
            group.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, help=_escape(help_text)
            )
        else:
            group.add_argument(*names, dest=f.name, metavar=_metavar(f), help=_escape(help_text))
    return parser


def _metavar(f: dataclasses.Field) -> str:
    if f.metadata["choices"]:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    kind = str(f.type)
    if "int" in kind or "float" in kind:
        return "N" if "int" in kind else "X"
    for suffix, metavar in (("_dir", "DIR"), ("_file", "FILE"), ("_path", "PATH"), ("_checkpoint", "PATH")):
        if f.name.endswith(suffix):
            return metavar
    return "JSON" if f.name == "deepspeed_overrides" else "NAME"


def _escape(text: str) -> str:
    return text.replace("%", "%%")
