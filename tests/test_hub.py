"""push_to_hub of a compressed model to the tests' loopback Hub, reloaded in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


pytest_plugins = ["fake_hub"]

TESTS = Path(__file__).parent

PUSH = """
import sys, torch
sys.path.insert(0, {tests!r})
import kron_transformers as kt
from safetensors.torch import save_file
from conftest import build_model, make_inputs
from test_surgery import METHODS
model = kt.compress_model(build_model("t5"), METHODS["word2ketxs_kpd"]())
inputs = make_inputs("t5")
with torch.no_grad():
    save_file(dict(inputs, logits=model(**inputs).logits), sys.argv[2])
model.push_to_hub(sys.argv[1])
kt.push_to_hub(model, sys.argv[1] + "-eval", base_model="google-t5/t5-small", metrics={{"bleu": 21.5}})
"""

LOAD = """
import sys, torch
import kron_transformers as kt
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM
expected = load_file(sys.argv[2])
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]).eval()
assert isinstance(model.lm_head, kt.TiedFactorizedHead) and model.lm_head.factorization is model.shared.factorization
with torch.no_grad():
    logits = model(input_ids=expected["input_ids"], labels=expected["labels"]).logits
torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
card = ModelCard.load(sys.argv[1])
assert card.data.library_name == "transformers", card.data
assert {"kron_transformers", "kpd", "shapeshifter", "word2ketxs"} <= set(card.data.tags), card.data.tags
print(card.text)
evaluated = ModelCard.load(sys.argv[1] + "-eval")
assert evaluated.data.base_model == "google-t5/t5-small"
assert "| bleu | 21.5 |" in evaluated.text
"""


def run_client(hub, code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=hub.env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_push_then_from_pretrained_in_a_fresh_process(fake_hub, tmp_path):
    expected = str(tmp_path / "expected.safetensors")
    run_client(fake_hub, PUSH.format(tests=str(TESTS)), "tester/t5-kron", expected)
    assert {"config.json", "model.safetensors", "README.md"} <= set(fake_hub.files("tester/t5-kron"))
    card = run_client(fake_hub, LOAD, "tester/t5-kron", expected)
    assert "## Parameters" in card and "| **model total** |" in card
    assert "*An Efficient Training Algorithm for Models with Block-wise Sparsity*, eq. 3" in card  # KPD's paper
    assert "T5ForConditionalGeneration.from_pretrained" in card
