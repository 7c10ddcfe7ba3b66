"""benchmarks/fsdp_translation.py end to end, shortened: the recipe's task under FSDP2 (2 gloo processes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).parent.parent / "benchmarks" / "fsdp_translation.py"


def test_fsdp_translation_benchmark_matches_one_process_and_resumes_identically():
    command = [sys.executable, str(SCRIPT), "--steps", "4", "--resume_at", "2", "--global_batch", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4]
    single, fsdp = [float(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert all(abs(a - b) <= 1e-5 + 1e-4 * abs(a) for a, b in zip(single, fsdp))
    assert [row[3].strip() for row in rows[:2]] == ["", ""] and [float(row[3]) for row in rows[2:]] == fsdp[2:]
    assert "within the DDP test's tolerance (rtol 0.0001, atol 1e-05): yes" in done.stdout
    assert "largest |resumed - uninterrupted| loss difference: 0.00e+00" in done.stdout
    assert (
        "factors sharded (DTensor, Shard(0)): True; tied head shares the embedding's factors: True, "
        "after reloading the gathered checkpoint: True" in done.stdout
    )
