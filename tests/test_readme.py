"""The README's commands and option table stay true to the code and to CI."""

import re
from pathlib import Path

from rayprune.config import JobConfig, flat_fields

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_lines():
    return [line.strip() for block in re.findall(r"```\n(.*?)```", README, re.S) for line in block.splitlines()]


def test_ci_runs_the_readme_test_command():
    ci_commands = [
        line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("python3.11 -m venv")
    ]
    assert len(ci_commands) == 1
    assert ci_commands[0] in code_lines()
    assert "pytest" in ci_commands[0]


def test_ci_lints_and_type_checks_before_the_tests():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    tests_at = next(i for i, line in enumerate(lines) if line.startswith("python3.11 -m venv"))
    before = [line.strip() for line in lines[:tests_at]]
    for check in (".venv/bin/ruff check .", ".venv/bin/mypy"):
        assert check in before, f".ci/run must run `{check}` before the tests"


def test_readme_run_command_starts_the_job():
    runs = [line for line in code_lines() if line.endswith("python jobs/prune.py")]
    assert runs and runs[0].startswith("python3.11 -m venv .venv && .venv/bin/pip install")


def test_options_in_readme_exist():
    options = flat_fields(JobConfig)
    documented = re.findall(r"^\| `--([a-z_.]+)", README, re.M)
    assert len(documented) >= 10
    for key in documented:
        assert key in options, f"README documents --{key}, which the CLI does not have"
