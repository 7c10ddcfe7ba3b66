"""benchmarks/calibration.py end to end on a checkpoint and tokenizer built here (no downloads)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import BertWordPieceTokenizer
from transformers import AutoConfig, AutoModel, BertTokenizerFast


SCRIPT = Path(__file__).parent.parent / "benchmarks" / "calibration.py"
WORDS = "a dog cat runs jumps over the red blue small big house tree park man woman child plays ball".split()


def test_calibration_benchmark_prints_the_table(tmp_path, capsys):
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(64)]
    (tmp_path / "text.txt").write_text("\n".join(sentences))
    word_piece = BertWordPieceTokenizer()
    word_piece.train_from_iterator(sentences, vocab_size=120)
    word_piece.save_model(str(tmp_path))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "encoder")
    config = AutoConfig.for_model(
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=len(tokenizer),
    )
    AutoModel.from_config(config).save_pretrained(tmp_path / "encoder")

    spec = importlib.util.spec_from_file_location("calibration_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        [
            "--model",
            str(tmp_path / "encoder"),
            "--data",
            str(tmp_path / "text.txt"),
            "--ratios",
            "2",
            "4",
            "--calibration",
            "32",
            "--eval",
            "16",
            "--batch-size",
            "8",
        ]
    )
    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines()[3:]]
    assert len(rows) == 4 * 2 * 2  # methods x ratios x (svd, calibrated)
    assert [row[2] for row in rows[:2]] == ["svd", "calibrated"]
    cosines = [float(row[7]) for row in rows]
    assert all(-1.0 <= c <= 1.0 for c in cosines)
    for svd, calibrated in zip(rows[::2], rows[1::2]):  # the weighted error: calibrated never worse than svd
        assert float(calibrated[6]) <= float(svd[6]) + 1e-6


def test_calibration_benchmark_names_a_missing_data_file(tmp_path):
    spec = importlib.util.spec_from_file_location("calibration_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="no such file or folder"):
        module.load_sentences(str(tmp_path / "missing.txt"), 4, 4)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match="Multi30k files"):
        module.load_sentences(str(tmp_path / "folder"), 4, 4)
