"""Shared fixtures: the repository's example rules, and a scratch rules directory seeded with them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_RULES = REPO / "rules"


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A copy of the example rules that a test may edit freely."""
    target = tmp_path / "rules"
    shutil.copytree(EXAMPLE_RULES, target)
    return target
