"""Flags, YAML recipes and their precedence; every shipped recipe validates."""

from pathlib import Path

import pytest
import yaml

from mpnet_dist.config import ConfigError, TrainConfig, build_parser, dump_yaml, load_yaml, parse_config
from mpnet_dist.data.pipeline import DEFAULT_DATASET

ROOT = Path(__file__).resolve().parents[1]

# Every flag of annotated-mpnet's pretrain-mpnet (research/anchor.md §1a) with its default.
REFERENCE_DEFAULTS = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_dim": 3072, "encoder_attention_heads": 12,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "tokenizer_name": "microsoft/mpnet-base",
    "max_positions": None, "max_tokens": 512, "relative_attention_num_buckets": None,
    "relative_attention_max_distance": None, "activation_fn": "gelu", "normalize_before": False,
    "train_dir": None, "valid_file": None, "test_file": None, "dataset_name": None, "text_field": "text",
    "buffer_size": 10000, "eval_samples": 500, "eval_interval_steps": None, "min_text_length": 64,
    "total_updates": 10000, "warmup_updates": None, "batch_size": 16, "update_freq": 8,
    "gradient_checkpointing": False, "beta1": 0.9, "beta2": 0.98, "weight_decay": 0.01, "clip_grad_norm": 1.0,
    "lr": 6e-4, "end_learning_rate": 0.0, "adam_eps": 1e-6, "power": 1.0, "checkpoint_interval": -1,
    "keep_checkpoints": -1, "checkpoint_dir": "./checkpoints", "tensorboard_log_dir": None, "logging_steps": 25,
    "debug": False, "seed": 12345, "num_workers": 0, "compile": False, "resume": False,
    "resume_checkpoint": None, "trust_checkpoint": False, "hf_model_path": None, "save_optimizer_state": False,
    "wandb": False, "wandb_project": "annotated-mpnet", "wandb_name": None, "wandb_id": None, "wandb_watch": False,
}  # fmt: skip


def test_every_reference_flag_exists_with_its_default():
    cfg = parse_config([])
    for name, default in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, name) == default, name


def test_reference_aliases_parse():
    cfg = parse_config(["-gc_steps", "4", "--save_steps", "100", "-wd", "0.1", "-prenorm", "-warmup_steps", "7",
                        "--logging_steps", "3", "-grad_clip", "0.5", "-end_lr", "1e-5", "-activation", "relu"])  # fmt: skip
    assert (cfg.update_freq, cfg.checkpoint_interval, cfg.weight_decay) == (4, 100, 0.1)
    assert cfg.normalize_before and cfg.warmup_updates == 7 and cfg.logging_steps == 3
    assert (cfg.clip_grad_norm, cfg.end_learning_rate, cfg.activation_fn) == (0.5, 1e-5, "relu")


def test_derived_defaults_follow_reference_rules():
    cfg = parse_config(["--total-updates", "1000"])
    assert cfg.resolved_warmup() == 100
    assert cfg.resolved_eval_interval() == 5000
    assert cfg.resolved_max_positions() == 512
    assert DEFAULT_DATASET == "HuggingFaceFW/fineweb-edu"  # without --train-dir or --dataset-name
    assert parse_config(["--checkpoint-interval", "50"]).resolved_eval_interval() == 50
    assert parse_config(["--eval-interval-steps", "0", "--total-updates", "9"]).resolved_eval_interval() == 9


def test_precedence_cli_over_yaml_over_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch-size: 4\nlr: 0.001\nupdate_freq: 2\npacking: false\n")
    cfg = parse_config(["--config", str(recipe), "--lr", "0.002"])
    assert cfg.batch_size == 4  # YAML over default
    assert cfg.lr == 0.002  # CLI over YAML
    assert cfg.update_freq == 2 and cfg.packing is False
    assert cfg.encoder_layers == 12  # default
    assert parse_config(["--config", str(recipe), "--packing"]).packing is True


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"batch_sise.*--batch-size"):
        parse_config(["--config", str(recipe)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "abc"], "--batch-size: expected int"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "-1"], "--lr"),
        (["--encoder-embed-dim", "100", "--encoder-attention-heads", "3"], "divisible"),
        (["--train-dir", "x"], "--train-dir, --valid-file and --test-file"),
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--hf-model-path", "x", "--resume"], "--hf-model-path cannot be combined"),
        (["--max-positions", "64", "--max-tokens", "128"], "--max-positions"),
    ],
)
def test_bad_values_name_the_flag(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(args)


def test_yaml_wrong_type_names_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("total-updates: lots\n")
    with pytest.raises(ConfigError, match="--total-updates: expected int"):
        parse_config(["--config", str(recipe)])


def test_yaml_is_loaded_safely(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="(?i)constructor|tag"):
        load_yaml(recipe)


def test_resume_checkpoint_implies_resume_and_empty_dataset_is_unset():
    cfg = parse_config(["--resume-checkpoint", "somewhere", "--dataset-name", ""])
    assert cfg.resume and cfg.dataset_name is None


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "launch_configs" / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_validate(recipe):
    cfg = parse_config(["--config", str(recipe)])
    assert isinstance(cfg, TrainConfig)


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for name in REFERENCE_DEFAULTS:
        assert "--" + name.replace("_", "-") in text


def test_settings_from_environment_variables_are_fields_and_land_in_config_yaml(tmp_path, monkeypatch):
    for variable in ("MPNET_DIST_TIMEOUT_S", "MPNET_DIST_DEEPSPEED_OVERRIDES", "MPNET_DIST_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    cfg = parse_config([])
    defaults = (1800, None, "~/.cache/mpnet_dist")
    assert (cfg.dist_timeout_s, cfg.deepspeed_overrides, cfg.data_cache_dir) == defaults
    monkeypatch.setenv("MPNET_DIST_TIMEOUT_S", "120")
    monkeypatch.setenv("MPNET_DIST_DEEPSPEED_OVERRIDES", '{"zero_optimization": {"stage": 3}}')
    monkeypatch.setenv("MPNET_DIST_CACHE", str(tmp_path / "cache"))
    cfg = parse_config([])
    dump_yaml(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["dist_timeout_s"] == 120 and saved["data_cache_dir"] == str(tmp_path / "cache")
    assert saved["deepspeed_overrides"] == '{"zero_optimization": {"stage": 3}}'
    assert TrainConfig(**saved) == cfg  # the saved file reproduces the run's settings
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dist-timeout-s: 300\n")
    assert parse_config(["--config", str(recipe)]).dist_timeout_s == 300  # a recipe beats the variable
    assert parse_config(["--dist-timeout-s", "60", "--data-cache-dir", "c"]).dist_timeout_s == 60


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("MPNET_DIST_TIMEOUT_S", "soon", r"\$MPNET_DIST_TIMEOUT_S \(sets --dist-timeout-s\): .*expected int"),
        ("MPNET_DIST_DEEPSPEED_OVERRIDES", "{stage: 3}", "--deepspeed-overrides .* must be a JSON object"),
    ],
)
def test_bad_environment_values_name_the_variable_or_flag(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        parse_config([])
