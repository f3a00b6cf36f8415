"""Every mistake a user can make, run end to end as a real process: exit code 2, one `error:` line on stderr
naming the culprit (flag or file), no traceback; `--debug` shows the traceback; a bug keeps its traceback.

The processes of the battery run a few at a time (most fail before any model is built, so each costs little
more than importing torch). Mistakes found before anything is built (flags, recipes, the other commands' flags)
are checked in this process instead, through the same main() functions: test_mistakes_found_before_anything_is_built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import CONFIGS, REPO, launch_env, tiny_args, train

PY = sys.executable
TRAIN = (PY, "-m", "mpnet_dist.train")
LAUNCH2 = (PY, "-m", "mpnet_dist", "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port",
           "0", "-m", "mpnet_dist.train")  # fmt: skip


def _checkpointed_run(corpus, root: Path) -> Path:
    """A finished 2-step run with step-1, step-2, best and final (in this process: cheap)."""
    run_dir = root / "good"
    args = tiny_args(corpus, run_dir, "--total-updates", "2", "--checkpoint-interval", "1")
    assert train([*args, "--eval-interval-steps", "1"]) == 0
    return run_dir


def _damaged(good: Path, root: Path, name: str, damage, old: bool = False) -> Path:
    """A copy of the run whose newest checkpoint (step-2 = final's step; step-N wins ties) is damaged."""
    run_dir = Path(shutil.copytree(good, root / name))
    folder = run_dir / "step-00000002"
    if old:  # as written before manifests existed (train_state.json format_version 1)
        state = json.loads((folder / "train_state.json").read_text())
        state.pop("manifest")
        (folder / "train_state.json").write_text(json.dumps({**state, "format_version": 1}))
    damage(folder)
    return run_dir


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _cases(corpus, root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (command, strings the error line must contain)."""
    good = _checkpointed_run(corpus, root)
    part1 = corpus["train_dir"] / "part1.txt"

    def data_dir(name: str, files: dict[str, bytes | str]) -> str:
        folder = root / name
        shutil.copy(part1, _write(folder / "z.txt", "").parent / "good.txt")
        (folder / "z.txt").unlink()
        for file, data in files.items():
            _write(folder / file, data)
        return str(folder)

    def train_cmd(*extra: str, run: str = "run") -> list[str]:
        return [*TRAIN, *tiny_args(corpus, root / run, *extra)]

    not_a_tokenizer = root / "not_a_tokenizer"
    not_a_tokenizer.mkdir()
    random_bytes = os.urandom(4096)
    return {
        "console script": ([PY, "-m", "mpnet_dist", "train", "--lr", "fast"], ["--lr"]),
        "fp16 on cpu": (train_cmd("--mixed-precision", "fp16"), ["--mixed-precision fp16", "CUDA"]),
        "missing train dir": (train_cmd("--train-dir", str(root / "absent")), [str(root / "absent")]),
        "empty file": (train_cmd("--train-dir", data_dir("empty", {"a.txt": ""})), ["a.txt", "empty"]),
        "binary file": (train_cmd("--train-dir", data_dir("binary", {"c.txt": random_bytes})), ["c.txt", "UTF-8"]),
        "wrong text field": (
            train_cmd("--train-dir", data_dir("fields", {"e.jsonl": '{"body": "hello"}\n'})),
            ["e.jsonl line 1", "--text-field"],
        ),
        "folder without a tokenizer": (
            train_cmd("--tokenizer-name", str(not_a_tokenizer)),
            [str(not_a_tokenizer), "--tokenizer-name"],
        ),
        "run folder in use": (train_cmd(run="good"), [str(good), "--resume", "--overwrite"]),
        "resume from nowhere": (train_cmd("--resume-checkpoint", str(root / "gone")), [str(root / "gone")]),
        "checkpoint lost its data state": (
            train_cmd("--resume", run=_damaged(good, root, "d1", lambda f: (f / "data_state_rank0.pt").unlink()).name),
            ["data_state_rank0.pt", "incomplete", "final is the newest other"],
        ),
        "random bytes in optimizer.bin": (
            train_cmd("--resume", run=_damaged(good, root, "d2", lambda f: _write(f / "optimizer.bin", random_bytes)).name),
            ["optimizer.bin", "damaged", "final is the newest other"],
        ),
        "truncated model.safetensors": (
            train_cmd("--resume", run=_damaged(good, root, "d3", lambda f: os.truncate(f / "model.safetensors", 100)).name),
            ["model.safetensors", "damaged", "truncated"],
        ),
        "broken train_state.json": (
            train_cmd("--resume-checkpoint", str(_damaged(good, root, "d4", lambda f: _write(f / "train_state.json", "{")) / "step-00000002")),
            ["train_state.json", "not valid JSON", "damaged"],
        ),
        "old checkpoint, random optimizer.bin": (
            train_cmd("--resume", "--trust-checkpoint", run=_damaged(good, root, "d5", lambda f: _write(f / "optimizer.bin", random_bytes), old=True).name),
            ["optimizer.bin", "damaged", "--trust-checkpoint cannot help"],
        ),
        "old checkpoint, lost data state": (
            train_cmd("--resume", run=_damaged(good, root, "d6", lambda f: (f / "data_state_rank0.pt").unlink(), old=True).name),
            ["data_state_rank0.pt", "incomplete"],
        ),
        "export of a non-checkpoint": (
            [PY, "-m", "mpnet_dist", "export", str(not_a_tokenizer), str(root / "hf")],
            [str(not_a_tokenizer), "not a complete mpnet-dist checkpoint"],
        ),
        "launcher, one process": (
            [PY, "-m", "mpnet_dist", "launch", "-m", "mpnet_dist.train", "--max-tokens", "abc"],
            ["--max-tokens"],
        ),
        "launcher, two processes": (
            [*LAUNCH2, *tiny_args(corpus, root / "run2", "--train-dir", data_dir("empty2", {"a.txt": ""}))],
            ["a.txt", "empty"],
        ),
        "run folder in use, two processes": (  # rank 0 decides; rank 1 takes its decision (one line)
            [*LAUNCH2, *tiny_args(corpus, good)],
            [str(good), "--resume", "--overwrite"],
        ),
    }  # fmt: skip


CASE_NAMES = [
    "console script", "fp16 on cpu", "missing train dir", "empty file", "binary file", "wrong text field",
    "folder without a tokenizer", "run folder in use", "resume from nowhere", "checkpoint lost its data state",
    "random bytes in optimizer.bin", "truncated model.safetensors", "broken train_state.json",
    "old checkpoint, random optimizer.bin", "old checkpoint, lost data state", "export of a non-checkpoint",
    "launcher, one process", "launcher, two processes", "run folder in use, two processes",
]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def battery(tiny_corpus, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    cases = _cases(tiny_corpus, tmp_path_factory.mktemp("bad_inputs"))
    assert sorted(cases) == sorted(CASE_NAMES)
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(cases, pool.map(_run, [cmd for cmd, _ in cases.values()]), strict=True))
    return {name: (done[name], culprits) for name, (_, culprits) in cases.items()}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_ends_in_one_line_naming_the_culprit(name, battery):
    result, culprits = battery[name]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "had defaults used instead" not in output  # Accelerate's launcher warning
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for culprit in culprits:
        assert culprit in errors[0], (culprit, errors[0])
    assert (
        "re-run with --trust-checkpoint" not in errors[0]
    )  # no pickle advice for files that are not pickles


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = _run([*TRAIN, "--max-tokens", "abc", "--debug"])
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_bug_keeps_its_traceback():
    """Not a user error: exit code 1 with the traceback, as for any crash."""
    code = "import sys, mpnet_dist.train as t\ndef boom(cfg): raise RuntimeError('internal bug')\nt.run = boom\nsys.exit(t.main(['--total-updates', '1']))"
    result = _run([PY, "-c", code])
    assert (
        result.returncode == 1
        and "Traceback" in result.stderr
        and "RuntimeError: internal bug" in result.stderr
    )


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    _write(root / "bad.yaml", "max_tokens: 32\nlr: [1, 2\n  x: y\n")
    _write(root / "typo.yaml", "max_tokens: 32\nlrr: 0.1\n")
    return root


# The same convention in this process, for mistakes found before anything is built (the same main() the
# processes above run; the process boundary adds nothing to them): (command, argv, strings the line names).
IN_PROCESS = [
    ("train", ["--max-tokens", "abc"], ["--max-tokens: expected int, got 'abc'"]),
    ("train", ["--max-tokns", "12"], ["unrecognized arguments: --max-tokns", "did you mean --max-tokens"]),
    ("train", ["--max-tokens"], ["--max-tokens: expected one argument"]),
    ("train", ["--config", "{root}/bad.yaml"], ["{root}/bad.yaml line 3, column 4: not valid YAML"]),
    ("train", ["--config", "{root}/typo.yaml"], ["{root}/typo.yaml", "unknown setting 'lrr'"]),
    ("train", ["--config", "{root}/nope.yaml"], ["--config {root}/nope.yaml: no such file"]),
    ("train", ["--max-tokens", "3"], ["--max-tokens 3 is below 9"]),
    ("train", ["--batch-size", "0"], ["--batch-size must be >= 1"]),
    ("train", ["--dropout", "1.5", "--lr", "-1"], ["--dropout must be in [0, 1)", "--lr"]),
    ("train", ["--train-dir", "x"], ["--train-dir, --valid-file and --test-file must be given together"]),
    ("train", ["--activation-fn", "tanh"], ["--activation-fn: 'tanh' is not one of"]),
    ("train", ["--deepspeed-overrides", "[1]"], ["--deepspeed-overrides"]),
    ("export", ["{root}", "{root}/hf", "--dtype", "float8"], ["--dtype: invalid choice: 'float8'"]),
    ("export", ["{root}"], ["the following arguments are required: out_dir"]),
    ("tokenizer", ["--files", "{root}/bad.yaml"], ["--output-dir"]),
    ("tokenizer", ["--files", "{root}/none.txt", "--output-dir", "{root}/t"], ["--files: no such file: {root}/none.txt"]),
    ("tokenizer", ["--builtin", "--output-dir", "{root}/t", "--vocab-size", "3"], ["--vocab-size 3"]),
    ("launch", ["--num_procs", "2"], ["--num_procs"]),
    ("launch", ["--config_file", "{root}/none.yaml", "-m", "mpnet_dist.train"], ["--config_file {root}/none.yaml: no such file"]),
]  # fmt: skip


@pytest.mark.parametrize("command, argv, culprits", IN_PROCESS)
def test_mistakes_found_before_anything_is_built(command, argv, culprits, recipes, capsys):
    from mpnet_dist.cli import COMMANDS

    module, func, _ = COMMANDS[command]
    main = getattr(__import__(module, fromlist=[func]), func)
    assert main([a.format(root=recipes) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpnet-dist {command}: error: "), err
    for culprit in culprits:
        assert culprit.format(root=recipes) in lines[0], (culprit, lines[0])


def test_unknown_command_and_version(capsys):
    from mpnet_dist import __version__
    from mpnet_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "mpnet-dist: error: unknown command 'trian'; the commands are train, launch, export, eval, fill-mask, "
        "plot, tokenizer, network (mpnet-dist --help)"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"mpnet-dist {__version__}\n"


def test_an_error_from_a_dataloader_worker_keeps_only_its_message():
    from mpnet_dist.command import one_line

    wrapped = (  # how torch re-raises a worker's exception in the main process
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "mpnet_dist.data.errors.DataError: shard.jsonl line 7: no field 'text'; pass --text-field\n"
    )
    assert one_line(wrapped) == "shard.jsonl line 7: no field 'text'; pass --text-field"
