"""The engine benchmark still runs (tiny N; timings are printed, never asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.decide import durable_available
from tests.conftest import REPO


@pytest.mark.parametrize("backend", ["durable", "python"])
def test_benchmark_smoke(backend: str) -> None:
    if backend == "durable" and not durable_available():
        pytest.skip("durable-rules is not importable here")
    proc = subprocess.run([sys.executable, "benchmarks/engine.py", "-n", "50", "--backend", backend], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 brokers, 12 accounts, 20 routing rules" in proc.stdout
    assert "decision / floor" in proc.stdout
