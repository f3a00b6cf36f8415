"""Elastic resume: load a checkpoint on another number of processes or under another kind (DDP <-> ZeRO-1/2/3).

A DDP checkpoint holds whole tensors and loads on any number of processes as it is. A ZeRO checkpoint splits the
fp32 weights and Adam moments over the processes that wrote it, each stage in its own layout, and DDP's optimizer
file is keyed by parameter index, not name: none of these loads into another layout. Such a resume goes through
DeepSpeed's *universal* checkpoint, one folder per parameter with its fp32 weight, exp_avg, exp_avg_sq and step:

    step-00000300/                  the checkpoint, never modified
    step-00000300.universal/        rank 0 writes it once (as .tmp-..., renamed when complete), reused while
        pytorch_model/zero/NAME/    CONVERTED records the source's train_state.json hash; pruned with its source
        pytorch_model/*_model_states.pt, random_states_*.pkl

A ZeRO source is converted by DeepSpeed's ds_to_universal, a DDP source here; both are then completed so that every
stage can load them (a per-parameter step, optimizer_state.pt in both the ZeRO-1/2 and the ZeRO-3 layout, both
model-states file names). A ZeRO run loads the folder with DeepSpeed's load_universal, switched on only for that
load, then repairs two ZeRO-3 defects of DeepSpeed 0.19 (every param group gets group 0's settings, e.g. weight
decay on biases; all groups share one `step` tensor, which AdamW then advances once per group). A DDP run reads
the folder into its model and optimizer, and its RNG state from the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.folders import universal_folder
from mpnet_dist.checkpoint.state import TRAIN_STATE_FILE, TrainState
from mpnet_dist.checkpoint.weights_only import deepspeed_safe_loads
from mpnet_dist.distributed import zero_stage
from mpnet_dist.optim import param_group_names

logger = logging.getLogger("mpnet_dist")

TAG = "pytorch_model"  # Accelerate's DeepSpeed tag folder (MODEL_NAME)
CONVERTED = "converted.json"  # written last: a universal folder without it is incomplete
LAYOUT_VERSION = 1  # of what _complete() writes; a folder of another version is converted again
_STATES = ("fp32", "exp_avg", "exp_avg_sq")
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Modules whose own torch.load(weights_only=False) reads checkpoint files during conversion or a universal load.
_DEEPSPEED_LOADERS = (
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.checkpoint.reshape_3d_utils",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.base_optimizer",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",
)


def kind(stage: int) -> str:
    return f"ZeRO-{stage}" if stage else "DDP"


def needs_conversion(train_state: TrainState, accelerator: Accelerator) -> bool:
    """A ZeRO checkpoint on another process count or stage, or a DDP checkpoint under ZeRO."""
    saved_stage, stage = train_state.zero_stage, zero_stage(accelerator)
    if saved_stage == 0:
        return stage > 0
    return saved_stage != stage or train_state.world_size != accelerator.num_processes


def load_converted(accelerator: Accelerator, path: Path, train_state: TrainState, trust: bool) -> None:
    """Collective: restore model, optimizer and RNG state from `path` through its universal form."""
    started = time.perf_counter()
    folder, reused = ensure_universal(accelerator, path, train_state, trust)
    stage = zero_stage(accelerator)
    if stage:
        _load_into_deepspeed(accelerator, folder, stage, trust)
    else:
        _load_into_ddp(accelerator, folder, path)
    saved = f"{kind(train_state.zero_stage)} on {train_state.world_size} process(es)"
    logger.info(
        "resuming %s (written by %s) as %s on %d process(es): %s universal checkpoint %s (%.1fs)",
        path.name, saved, kind(stage), accelerator.num_processes, "reused" if reused else "converted to",
        folder, time.perf_counter() - started,
    )  # fmt: skip


def ensure_universal(
    accelerator: Accelerator, path: Path, train_state: TrainState, trust: bool
) -> tuple[Path, bool]:
    """Collective: rank 0 writes path's universal folder unless an up-to-date one exists; every rank gets it."""
    folder, source = universal_folder(path), _source_record(path)
    reused = _is_current(folder, source)
    error = None
    if accelerator.is_main_process and not reused:
        try:
            _convert(path, folder, train_state, source, trust)
        except Exception as err:  # every rank must leave the collective below, then all raise
            error = err
            logger.error(
                "converting %s to a universal checkpoint failed: %s: %s", path, type(err).__name__, err
            )
    failed = torch.tensor(0.0 if error is None else 1.0, device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item():
        if isinstance(error, CheckpointError):
            raise error
        if isinstance(error, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path}: a checkpoint file holds objects that a weights-only load refuses to unpickle ({error}). "
                "Unpickling can run arbitrary code: only if you trust this checkpoint (you or your team wrote "
                "it), re-run with --trust-checkpoint."
            ) from error
        raise CheckpointError(
            f"could not convert {path} into {folder} for a resume on {accelerator.num_processes} process(es) "
            f"({type(error).__name__ + ': ' + str(error) if error else 'failed on rank 0; see its log'}). Resume "
            f"with the launch config and process count that wrote it (train_state.json: zero_stage "
            f"{train_state.zero_stage}, world_size {train_state.world_size}), or export the "
            f"weights (`mpnet-dist export {path} OUT`) and start a new run with --hf-model-path OUT."
        ) from error
    return folder, reused


def _source_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256((path / TRAIN_STATE_FILE).read_bytes()).hexdigest()
    return {"source": path.name, "train_state_sha256": digest, "layout": LAYOUT_VERSION}


def _write_record(file: Path, record: dict[str, Any]) -> None:
    with open(file, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _is_current(folder: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / CONVERTED).read_text()) == source
    except (OSError, ValueError):
        return False


def _convert(path: Path, folder: Path, train_state: TrainState, source: dict[str, Any], trust: bool) -> None:
    """Write the universal folder under a name of this process's own (two jobs resuming the same checkpoint at
    once each convert), then rename it into place unless the other finished first."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tag = tmp / TAG
    try:
        tag.mkdir(parents=True)
        groups, shapes = _layout(train_state)
        if train_state.zero_stage:
            state = _from_zero(path / TAG, tag, trust)
        else:
            state = _from_ddp(path, tag, groups, trust)
        _complete(tag, groups, shapes, state, train_state)
        for rng in path.glob("random_states_*.pkl"):
            shutil.copy2(rng, tmp / rng.name)
        _write_record(tmp / CONVERTED, source)  # last: marks the folder complete
        if not _is_current(folder, source):
            stale = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            if folder.exists():
                folder.rename(stale)  # converted from an older checkpoint of the same name (best/, final/)
            tmp.rename(folder)
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:
        free = shutil.disk_usage(folder.parent).free / 2**20
        raise OSError(f"{err} ({free:.1f} MiB free on its disk)") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _layout(train_state: TrainState) -> tuple[tuple[list[str], list[str]], dict[str, torch.Size]]:
    """The optimizer's parameter order and the parameter shapes of the checkpoint's architecture (from a copy
    built on the meta device: no memory)."""
    from mpnet_dist.model import MPNetConfig, MPNetForPretraining

    with torch.device("meta"):
        model = MPNetForPretraining(MPNetConfig.from_dict(train_state.model_config))
    return param_group_names(model), {name: p.shape for name, p in model.named_parameters()}


def _from_zero(source_tag: Path, tag: Path, trust: bool) -> dict[str, Any]:
    """DeepSpeed's converter (in this process: no worker pool, its console output kept out of the log)."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(source_tag), output_folder=str(tag), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    with (
        safe_loads(trust),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        ds_to_universal.main(args)
    (tag.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer file; we name the tag
    sd = _load(tag / "zero" / "optimizer_state.pt", trust)
    inner = sd.get("optimizer_state_dict") or {}
    step = inner.get("state", {}).get(0, {}).get("step")  # ZeRO-3 keeps one step for all; ZeRO-1/2 per param
    return {"param_groups": sd["param_groups"], "step": step, "extra": sd}


def _from_ddp(path: Path, tag: Path, groups: tuple[list[str], list[str]], trust: bool) -> dict[str, Any]:
    """model.safetensors + optimizer.bin (torch AdamW, state keyed by index in group order) -> zero/NAME/*.pt."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    optim = _load(path / "optimizer.bin", trust)
    zero = tag / "zero"
    for names, group in zip(groups, optim["param_groups"], strict=True):
        if len(names) != len(group["params"]):
            raise ValueError(
                f"optimizer.bin has {len(group['params'])} parameters in a group of {len(names)}"
            )
        for name, index in zip(names, group["params"], strict=True):
            state = optim["state"].get(index, {})
            (zero / name).mkdir(parents=True)
            values = {"fp32": weights[name], **{k: state.get(k) for k in _STATES[1:]}}
            for key, value in values.items():
                if value is None:  # never stepped: Adam's moments start at zero
                    value = torch.zeros_like(weights[name])
                torch.save({"param": value.float().contiguous()}, zero / name / f"{key}.pt")
            torch.save(state.get("step", torch.tensor(0.0)), zero / name / "step.pt")
    return {"param_groups": optim["param_groups"], "step": None, "extra": {}}


def _complete(
    tag: Path,
    groups: tuple[list[str], list[str]],
    shapes: dict[str, torch.Size],
    state: dict[str, Any],
    train_state: TrainState,
) -> None:
    """Make the folder loadable by every ZeRO stage: the converters write only what the source stage reads."""
    names = [name for group in groups for name in group]
    step = _complete_parameters(tag / "zero", names, shapes, state["step"])
    param_groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    for index, group in enumerate(param_groups):
        group["params"] = [index]
    keep = {k: v for k, v in state["extra"].items() if k in ("loss_scaler", "dynamic_loss_scale", "overflow")}
    optimizer_state = {
        **keep,
        "ds_version": _deepspeed_version(),
        "param_groups": param_groups,  # ZeRO-1/2 read these, group by group
        "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": param_groups},  # ZeRO-3
    }
    torch.save(optimizer_state, tag / "zero" / "optimizer_state.pt")
    _complete_model_states(tag, train_state)


def _complete_parameters(
    zero: Path, names: list[str], shapes: dict[str, torch.Size], step: torch.Tensor | None
) -> torch.Tensor:
    """Every parameter's fp32/exp_avg/exp_avg_sq as {"param": tensor of its shape} (ZeRO-3's converter writes
    flat bare tensors; ZeRO-1/2 read the former) and a step.pt (ZeRO-3 keeps one step for all); -> the step."""
    missing = [name for name in names if not (zero / name / "fp32.pt").is_file()]
    if missing:
        raise ValueError(f"no fp32 weights for {missing[:5]} in the converted checkpoint")
    for name in names:
        for key in _STATES:
            value = torch.load(zero / name / f"{key}.pt", weights_only=True)
            if not isinstance(value, dict):
                torch.save({"param": value.reshape(shapes[name])}, zero / name / f"{key}.pt")
        if not (zero / name / "step.pt").is_file():
            if step is None:
                raise ValueError(f"no optimizer step for {name}")
            torch.save(step, zero / name / "step.pt")
    return step if step is not None else torch.load(zero / names[0] / "step.pt", weights_only=True)


def _complete_model_states(tag: Path, train_state: TrainState) -> None:
    """The engine reads its counters from mp_rank_00_model_states.pt (ZeRO-1/2) or zero_pp_rank_0_... (ZeRO-3):
    copy the source stage's file under the other name, or write the counters for a DDP source."""
    existing = [tag / name for name in _MODEL_STATES if (tag / name).is_file()]
    if existing:
        for name in _MODEL_STATES:
            if not (tag / name).is_file():
                shutil.copy2(existing[0], tag / name)
        return
    counters = {
        "global_steps": train_state.step,
        "global_samples": 0,
        "skipped_steps": 0,
        "dp_world_size": train_state.world_size,
        "mp_world_size": 1,
        "ds_version": _deepspeed_version(),
        "module": None,
    }
    for name in _MODEL_STATES:
        torch.save(counters, tag / name)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _load_into_deepspeed(accelerator: Accelerator, folder: Path, stage: int, trust: bool) -> None:
    # Accelerate's load_state loads into its registry of prepared models: the engine is the first.
    engine = accelerator._models[0]
    engine._config.load_universal_checkpoint = True  # for this load only: a normal load with it on fails
    try:
        with safe_loads(trust):
            accelerator.load_state(str(folder))
    finally:
        engine._config.load_universal_checkpoint = False
    if stage == 3:
        saved = _load(folder / TAG / "zero" / "optimizer_state.pt", trust)["param_groups"]
        _repair_zero3_groups(engine.optimizer, saved)


def _repair_zero3_groups(zero_optimizer: Any, saved_groups: list[dict[str, Any]]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load copies param_groups[0]'s settings into every group and gives all
    groups one shared `step` tensor (AdamW would advance it once per group): restore each group's own.

    ZeRO-3 keeps the base optimizer's groups empty between steps; the state is keyed by the flat fp32 partitions.
    """
    base = zero_optimizer.optimizer
    for group, saved in zip(base.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for flat in zero_optimizer.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_into_ddp(accelerator: Accelerator, folder: Path, source: Path) -> None:
    """Weights and Adam state from the universal folder (whole tensors on every rank); RNG from the checkpoint."""
    from accelerate.checkpointing import load_accelerator_state

    model, optimizer = accelerator.unwrap_model(accelerator._models[0]), accelerator._optimizers[0]
    zero = folder / TAG / "zero"
    groups = param_group_names(model)

    def read(name: str, key: str) -> torch.Tensor:
        value = torch.load(zero / name / f"{key}.pt", weights_only=True)
        return value["param"] if isinstance(value, dict) else value  # ZeRO-3's converter stores bare tensors

    params = dict(model.named_parameters())
    weights = {name: read(name, "fp32").view_as(params[name]) for name in params}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(model.state_dict()) - set(params)
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})"
        )
    saved_groups = _load(zero / "optimizer_state.pt", trust=False)["param_groups"]
    state, index, param_groups = {}, 0, []
    for names, saved in zip(groups, saved_groups, strict=True):
        param_groups.append({**saved, "params": list(range(index, index + len(names)))})
        for name in names:
            state[index] = {"step": torch.load(zero / name / "step.pt", weights_only=True).clone()}
            state[index].update({k: read(name, k).view_as(params[name]) for k in _STATES[1:]})
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    load_accelerator_state(str(source), [], [], [], [], accelerator.process_index)  # RNG states only


def _load(file: Path, trust: bool) -> Any:
    with safe_loads(trust):
        return torch.load(file, map_location="cpu", weights_only=not trust)


@contextlib.contextmanager
def safe_loads(trust: bool) -> Iterator[None]:
    """DeepSpeed's converter and universal loader call torch.load(weights_only=False) themselves: make them
    weights-only (with the allow-list of DeepSpeed's own objects) unless --trust-checkpoint."""
    import importlib

    with contextlib.ExitStack() as stack:
        for name in _DEEPSPEED_LOADERS:
            with contextlib.suppress(ImportError):
                stack.enter_context(deepspeed_safe_loads(importlib.import_module(name), trust))
        yield
