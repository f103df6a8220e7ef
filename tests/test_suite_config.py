"""The test suite's own set-up: the ``slow`` marker names tests that exist, is registered,
and the README's test command still runs every test."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import SLOW_TESTS

TESTS = Path(__file__).parent
REPO = TESTS.parent


def test_every_slow_entry_names_an_existing_test():
    for entry in SLOW_TESTS:
        module, _, name = entry.partition("::")
        path = TESTS / module
        assert path.is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", path.read_text(encoding="utf-8"), re.M), entry


def test_the_marker_is_registered_and_the_readme_runs_everything():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    options = pyproject.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^markers = \["slow: ', options, re.M)
    (addopts,) = re.findall(r'^addopts = "(.*)"$', options, re.M)
    assert "--strict-markers" in addopts.split() and "-m" not in addopts.split()  # no test left out by default
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    runs = [line.rsplit("pytest", 1)[1] for line in readme.splitlines() if re.search(r"(^|&& )pytest\b", line)]
    assert runs and all("-m" not in run.split() for run in runs)
