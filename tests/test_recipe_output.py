"""What a recipe writes to a log: one report, a line per --logging_steps instead of a progress bar, no
shared-tensor warning when it checkpoints a tied model; --help lists only the recipe's own arguments."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import image_classification  # noqa: E402
import translation  # noqa: E402
from recipe_kit.errors import RecipeError  # noqa: E402


TINY = [
    "--config_overrides", "d_model=32,d_ff=64,num_heads=2,d_kv=16,num_layers=1,num_decoder_layers=1",
    "--max_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "2", "--max_train_samples", "32",
    "--max_eval_samples", "4", "--per_device_train_batch_size", "8", "--generation_max_length", "4",
    "--tokenizer_vocab_size", "120", "--warmup_steps", "2",
]  # fmt: skip


def test_a_logged_run_prints_one_report_step_lines_and_no_shared_tensor_warning(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        translation.main([*TINY, "--output_dir", str(tmp_path)])  # tied T5 embedding, compressed by the preset
    out, err = capsys.readouterr()
    assert out.count("model parameters:") == 1
    assert "translation: step 2/4, loss " in out and "translation: step 4/4, loss " in out
    assert "%|" not in err and "it/s" not in err  # no progress bar in a non-terminal log
    assert "Removed shared tensor" not in caplog.text + err
    assert (tmp_path / "checkpoints" / "step_2" / "model.safetensors").is_file()


def test_help_lists_only_the_recipe_s_own_arguments(capsys):
    with pytest.raises(SystemExit):
        image_classification.main(["--help"])
    images = capsys.readouterr().out
    with pytest.raises(SystemExit):
        translation.main(["--help"])
    text = capsys.readouterr().out
    assert "--tokenizer" not in images and "--num_beams" not in images and "--augment" in images
    assert "--tokenizer" in text and "--image_column" not in text and "--augment" not in text
    with pytest.raises(RecipeError, match="--tokenizer does not apply to this recipe"):
        image_classification.main(["--tokenizer", "byte"])
