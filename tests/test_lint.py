"""The code stays clean of the rules in ruff.toml (unused or undefined names, bare excepts, ...)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format', 'concise', '.'],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail('`python -m ruff check .` found problems; fix them (or the rule in ruff.toml if it is wrong '
                    'for this code):\n' + result.stdout + result.stderr, pytrace=False)
