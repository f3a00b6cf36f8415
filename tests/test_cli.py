"""The console script: subcommand table, help, errors."""

import importlib
import re
import subprocess
import sys

import pytest

from mpnet_dist import __version__
from mpnet_dist.cli import COMMANDS, main
from tests.helpers import REPO


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "export", "tokenizer"):
        assert name in COMMANDS and name in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "mpnet_dist", command, "--help"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_train_help_is_grouped_as_the_readme_and_states_each_default_once():
    from mpnet_dist.config import FIELDS, build_parser
    from mpnet_dist.flags import FLAG_GROUPS

    parser = build_parser()
    titles = [g.title for g in parser._action_groups if g._group_actions and g.title != "options"]
    assert titles == list(FLAG_GROUPS)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == set(FIELDS) | {"config"}
    for action in flags:
        assert action.help and action.help.count("default") <= 1, (action.dest, action.help)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| group | flags (default) |") : readme.index("Three of them can also come")]
    for name, members in FLAG_GROUPS.items():  # the README's table has the same groups and every flag
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        for member in members:
            assert "--" + member.replace("_", "-") in row, (name, member)


@pytest.mark.parametrize("command", ["tokenizer", "export"])
def test_every_flag_of_the_other_commands_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(COMMANDS[command][0]), COMMANDS[command][1])(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    entries = re.findall(r"^  (-[^\n]*?)(?:  +(\S.*))?$", out, flags=re.MULTILINE)
    assert entries
    for flag_text, help_text in entries:  # a flag with no help on its own line continues on the next one
        assert help_text or out.split(flag_text, 1)[1].split("\n", 2)[1].startswith(" " * 10), flag_text


def test_version():
    out = subprocess.run([sys.executable, "-m", "mpnet_dist", "--version"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == f"mpnet-dist {__version__}"
