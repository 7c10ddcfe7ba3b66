"""recipes/compress_pretrained.py end to end, offline: a tiny BERT from a config, generated text, trained tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM, AutoTokenizer


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import compress_pretrained  # noqa: E402
from recipe_kit.errors import RecipeError  # noqa: E402


FAST = ["--calibration_samples", "64", "--eval_samples", "48", "--distill_steps", "60"]


def test_recipe_recovers_fidelity_over_the_svd_only_model(tmp_path):
    texts = compress_pretrained.generated_texts(112)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"body": text}) + "\n" for text in texts))
    output = tmp_path / "out"
    compress_pretrained.main(
        [*FAST, "--calibration_file", str(data), "--text_column", "body", "--output_dir", str(output)]
        + ["--reconstruct_steps", "40", "80", "--reconstruct_trainable", "block"]
    )
    results = json.loads((output / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["compressed (svd)", "reconstructed", "distilled"]
    assert [block["steps"] for block in results["reconstruction"]] == [40, 80]  # one count per block
    assert all(block["error_after"] < block["error_before"] for block in results["reconstruction"])
    svd, final = stages["compressed (svd)"], stages["distilled"]
    assert final["cosine"] > svd["cosine"] + 0.2
    assert final["logit_kl"] < 0.5 * svd["logit_kl"] and final["top1_agreement"] > svd["top1_agreement"]
    assert results["parameters"] < results["dense_parameters"] and results["eval_inputs"] == 48
    model = AutoModelForMaskedLM.from_pretrained(output)
    assert sum(p.numel() for p in model.parameters()) == results["parameters"]
    assert len(AutoTokenizer.from_pretrained(output)) == model.config.vocab_size
    card = (output / "README.md").read_text()
    assert f"{final['cosine']:.4g}" in card and "cosine vs dense" in card


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(RecipeError, match="--init must be one of"):
        compress_pretrained.main(["--init", "exact"])
    with pytest.raises(RecipeError, match="no such file"):
        compress_pretrained.main(["--calibration_file", str(tmp_path / "missing.txt")])
    with pytest.raises(RecipeError, match="this recipe compresses"):
        compress_pretrained.main(["--compression", "none", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(RecipeError, match="--reconstruct_trainable must be one of compressed, block"):
        compress_pretrained.main(["--reconstruct_trainable", "all"])
    with pytest.raises(RecipeError, match=r"must be >= 0, got \[5, -1\] and 300"):
        compress_pretrained.main(["--reconstruct_steps", "5", "-1"])
    with pytest.raises(RecipeError, match="has 3 counts; give one, or one per block of BertForMaskedLM "):
        compress_pretrained.main(["--reconstruct_steps", "5", "5", "5", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
