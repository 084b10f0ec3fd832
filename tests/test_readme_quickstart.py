"""The README's quick start: exactly two commands, each making and using a virtualenv (so they
work on Debian's externally-managed Python, PEP 668), run from the checkout; CI runs the test
command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = "python3 -m venv .venv && . .venv/bin/activate && pip install "


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("Try it:", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [block.strip() for block in blocks]


def test_exactly_two_one_line_commands_each_in_a_virtualenv():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert "\n" not in command
        assert command.startswith(VENV), command
    run, test = commands
    assert run.endswith("gunicorn -c gunicorn.conf.py")
    assert "pip install . " in run
    assert test == VENV + "-e '.[test]' && pytest"


def test_readme_says_to_run_them_from_the_checkout():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("```", 1)[0]
    assert "checkout" in section and "gunicorn.conf.py" in section
    assert "python3-venv" in section  # Debian ships venv separately


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    assert quick_start_commands()[1] in lines
