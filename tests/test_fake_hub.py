"""`push_to_hub` then `from_pretrained` round trip through the fake Hub, with plain transformers.

`huggingface_hub` reads `HF_ENDPOINT` when it is first imported, so every client runs in a fresh subprocess.
"""

import subprocess
import sys

import pytest


pytest_plugins = ["fake_hub"]

REPO_ID = "tester/tiny-bert"

PUSH = """
import sys, torch
from transformers import AutoConfig, AutoModel
torch.manual_seed(0)
config = AutoConfig.for_model(
    "bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99
)
model = AutoModel.from_config(config).eval()
input_ids = torch.randint(0, 99, (2, 7))
from safetensors.torch import save_file
with torch.no_grad():
    save_file({"input_ids": input_ids, "output": model(input_ids).last_hidden_state}, sys.argv[2])
model.push_to_hub(sys.argv[1])
"""

LOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModel
expected = load_file(sys.argv[2])
model = AutoModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    output = model(expected["input_ids"]).last_hidden_state
torch.testing.assert_close(output, expected["output"], rtol=0, atol=0)
"""

HUB_API = """
import os, sys
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
repo_id = sys.argv[1]
assert ModelCard.load(repo_id).data.library_name == "transformers"
print(*sorted(os.listdir(snapshot_download(repo_id))))
print(*HfApi().list_repo_files(repo_id))
print(*[f.path for f in HfApi().list_repo_tree(repo_id, recursive=True) if f.lfs])
HfApi().create_repo("tester/empty")
try:
    ModelCard.load("tester/empty")
except EntryNotFoundError:
    print("no card")
"""


def run_client(hub, code: str, *args: str) -> str:
    """Runs `code` in a fresh Python process that talks to `hub`; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=hub.env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def pushed_model(fake_hub, tmp_path_factory):
    """Pushes a tiny random BERT to REPO_ID; returns the file holding its inputs and outputs."""
    path = tmp_path_factory.mktemp("outputs") / "expected.safetensors"
    run_client(fake_hub, PUSH, REPO_ID, str(path))
    return path


def test_from_pretrained_gives_the_pushed_model(fake_hub, pushed_model):
    run_client(fake_hub, LOAD, REPO_ID, str(pushed_model))


def test_pushed_files(fake_hub, pushed_model):
    assert {"config.json", "model.safetensors", "README.md"} <= set(fake_hub.files(REPO_ID))


def test_model_card_snapshot_and_listings(fake_hub, pushed_model):
    snapshot, listing, lfs, missing = run_client(fake_hub, HUB_API, REPO_ID).splitlines()
    files = " ".join(fake_hub.files(REPO_ID))
    assert (snapshot, listing, lfs, missing) == (files, files, "model.safetensors", "no card")


def test_second_push_to_the_same_repo(fake_hub, pushed_model, tmp_path):
    """create_repo(exist_ok=True) reads the url from the Hub's 409 reply; the second push then commits."""
    before = fake_hub.latest_commit(REPO_ID, "main").sha
    expected = str(tmp_path / "second.safetensors")
    run_client(fake_hub, PUSH.replace("manual_seed(0)", "manual_seed(1)"), REPO_ID, expected)
    assert fake_hub.latest_commit(REPO_ID, "main").sha != before
    run_client(fake_hub, LOAD, REPO_ID, expected)
