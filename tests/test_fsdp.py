"""FSDP2 (``fully_shard``) on a compressed model: 2 CPU processes (gloo) against one process, same global batch.

Accelerate 1.x sets up FSDP only for accelerator devices (on CPU it falls back to DDP), so this test drives
``fully_shard`` directly, wrapped as ``recipes/accelerate_fsdp.yaml`` asks Accelerate to wrap (one unit per
transformer block, the root holding the embeddings and the tied head); see tests/fsdp_worker.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


WORKER = Path(__file__).parent / "fsdp_worker.py"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    done = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((output / "result.json").read_text())


def test_factors_are_sharded_and_tied_factors_stay_one_parameter(fsdp_run):
    assert fsdp_run["factors_sharded"] and fsdp_run["tied"]


def test_two_processes_match_one_process_with_the_same_global_batch(fsdp_run):
    assert fsdp_run["fsdp_losses"] == pytest.approx(fsdp_run["single_losses"], rel=1e-4, abs=1e-5)


def test_a_sharded_checkpoint_resumes_with_the_same_losses(fsdp_run):
    assert fsdp_run["resumed_losses"] == pytest.approx(fsdp_run["fsdp_losses"][2:], rel=1e-6)


def test_the_gathered_full_state_dict_reloads_through_the_plugin(fsdp_run):
    assert fsdp_run["reloaded_tied"] and fsdp_run["same_keys"]
    assert fsdp_run["max_parameter_difference"] < 1e-5
