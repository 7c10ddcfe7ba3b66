"""``benchmarks/gpu_check.sh --cpu-smoke``: the one-command GPU check runs end to end on CPU at toy size and writes
its single markdown table (the GPU run itself needs a GPU; no number here is a measurement)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cpu_smoke_run_writes_one_markdown_table(tmp_path):
    environment = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check: CPU smoke run")
    assert report.count("| device | dtype | layer |") == 1
    rows = [line for line in report.splitlines() if line.startswith("| CPU")]
    methods = {line.split(" | ")[4] for line in rows}
    assert methods == {
        "dense",
        "kron r16 factored",
        "kron r16 materialized",
        "kpd r4 b4 factored",
        "kpd r4 b4 materialized",
    }
    assert all(line.split(" | ")[3] == "1x8" for line in rows)
    assert "dry run, not run:" in report and "tests/test_triton_kron_linear.py" in report


def test_backend_speed_smoke_times_every_dispatched_op_with_both_backends():
    pytest.importorskip("triton")
    script = SCRIPT.parent / "backend_speed.py"
    environment = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    arguments = ["--device", "cpu", "--smoke", "--dtype", "float32", "--tokens", "8"]
    result = subprocess.run(
        [sys.executable, str(script), *arguments], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[-1:] and line.endswith("x")]
    ops = {row[0] for row in rows}
    assert ops == {
        "kron_matmul",
        "kpd_matmul",
        "block_sparse_matmul",
        "kron_gather_rows",
        "tt_gather_rows",
        "tt_embedding_bag",
    }
    assert len(rows) == 14  # 7 cases (word2ketXS of order 2 and 3), forward and forward + backward each
    assert all(float(row[-3]) > 0 and float(row[-2]) > 0 for row in rows)
