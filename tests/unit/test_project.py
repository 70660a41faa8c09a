"""The project keeps its promises to newcomers: README commands, module map, lint, types."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest"
RUN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . "
    "&& serve run configs/cluster.yaml"
)


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in README
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in ci_lines


def test_readme_starts_the_cluster_from_the_default_config():
    assert RUN_COMMAND in README


def test_module_map_matches_the_tree():
    """Every module of the packages is in the README's map, itself or by its folder's row."""
    rows = re.findall(r"^\| `((?:cluster|serve_app)/[\w/]+(?:\.py|/))` \|", README, re.M)
    folders = tuple(row for row in rows if row.endswith("/"))
    listed = {row for row in rows if not row.endswith("/")}
    on_disk = {
        str(path.relative_to(ROOT))
        for package in ("cluster", "serve_app")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    assert all(any(str(p).startswith(f) for p in on_disk) for f in folders)
    assert listed == {path for path in on_disk if not path.startswith(folders)}


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-cluster"],
)
def test_tooling_is_clean(command):
    tool = Path(sys.executable).parent / command[0]
    result = subprocess.run(
        [str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
