"""``kron-transformers compress --calibration-data``: text lines, .jsonl and image folders; the tokenizer is copied."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

import kron_transformers as kt
from kron_transformers.calibration_data import calibration_batches, read_calibration_inputs
from kron_transformers.cli import main


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB`` ids (the tiny test models' vocabulary), built offline."""
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def sentences(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"w{i}" for i in rng.integers(2, VOCAB, size=rng.integers(3, 9))) for _ in range(count)]


@pytest.fixture
def saved_bert(tmp_path):
    build_model("bert").save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "cfg.yaml").write_text("ffn: {method: LowRank, rank: 2}\ninit: calibrated\n")
    return tmp_path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_compress_with_calibration_data_copies_the_tokenizer(saved_bert, suffix):
    texts = sentences(24)
    data = saved_bert / f"calibration{suffix}"
    if suffix == ".jsonl":
        data.write_text("".join(json.dumps({"sentence": text, "id": i}) + "\n" for i, text in enumerate(texts)))
        extra = ["--text-column", "sentence"]
    else:
        data.write_text("\n".join(texts) + "\n")
        extra = []
    output = saved_bert / "kron"
    code = main(["compress", str(saved_bert / "dense"), "--config", str(saved_bert / "cfg.yaml"), "--output",
                 str(output), "--calibration-data", str(data), "--calibration-batch-size", "8", *extra])  # fmt: skip
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("w5 w7")["input_ids"] == word_tokenizer()("w5 w7")["input_ids"]
    compressed = AutoModelForMaskedLM.from_pretrained(output).eval()
    entry = kt.applied_config(compressed).modules["bert.encoder.layer.0.intermediate.dense"]
    assert entry["init"] == "calibrated"
    batches = calibration_batches(word_tokenizer(), texts, batch_size=8)
    expected = kt.compress_model(
        build_model("bert"), kt.KronConfig(ffn=kt.LowRank(rank=2), init="calibrated"), calibration_data=batches
    )
    with torch.no_grad():
        torch.testing.assert_close(compressed(**batches[0]).logits, expected(**batches[0]).logits)


def test_calibrated_without_data_and_a_missing_column_fail_in_one_line(saved_bert, capsys):
    args = ["compress", str(saved_bert / "dense"), "--config", str(saved_bert / "cfg.yaml"), "--output",
            str(saved_bert / "kron")]  # fmt: skip
    assert main(args) == 2
    assert "needs --calibration-data" in capsys.readouterr().err
    (saved_bert / "bad.jsonl").write_text('{"text": "w3 w4"}\n')
    assert main([*args, "--calibration-data", str(saved_bert / "bad.jsonl"), "--text-column", "body"]) == 2
    assert "has no column 'body'" in capsys.readouterr().err
    assert not (saved_bert / "kron").exists()


def test_text_calibration_batches_are_grouped_by_length():
    texts = sentences(40)
    tokenizer = word_tokenizer()
    grouped, file_order = (calibration_batches(tokenizer, texts, 8, group_by_length=g) for g in (True, False))

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    def decoded(batches):
        return sorted(
            " ".join(tokenizer.convert_ids_to_tokens([int(i) for i, m in zip(row, mask) if m]))
            for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])
        )  # fmt: skip

    assert padding(file_order) > 0 and padding(grouped) < padding(file_order) / 4
    assert decoded(grouped) == decoded(file_order) == sorted(texts)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in grouped]
    assert lengths != sorted(lengths)  # batches in a seeded random order, not shortest first
    assert [int(b["attention_mask"].sum(1).max()) for b in calibration_batches(tokenizer, texts, 8)] == lengths


def test_image_folder_calibration_inputs(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    for index in range(3):
        folder = tmp_path / "images" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    images = read_calibration_inputs(tmp_path / "images")
    assert len(images) == 3 and images[0].size == (20, 20)
    batches = calibration_batches(ViTImageProcessor(size={"height": 16, "width": 16}), images, batch_size=2)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]


def test_layer_by_layer_compresses_block_by_block_like_compress_pretrained(saved_bert, capsys):
    data = saved_bert / "calibration.txt"
    texts = sentences(16)
    data.write_text("\n".join(texts) + "\n")
    args = ["compress", str(saved_bert / "dense"), "--config", str(saved_bert / "cfg.yaml"), "--output",
            str(saved_bert / "kron"), "--calibration-data", str(data), "--calibration-batch-size", "8"]  # fmt: skip
    assert main([*args, "--layer-by-layer"]) == 0
    compressed = AutoModelForMaskedLM.from_pretrained(saved_bert / "kron").eval()
    batches = calibration_batches(word_tokenizer(), texts, batch_size=8)
    config = kt.KronConfig(ffn=kt.LowRank(rank=2), init="calibrated")
    expected = kt.compress_pretrained(saved_bert / "dense", config, batches)
    state = expected.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in compressed.state_dict().items())
    (saved_bert / "svd.yaml").write_text("ffn: {method: LowRank, rank: 2}\ninit: svd\n")
    assert main([*args[:3], str(saved_bert / "svd.yaml"), *args[4:], "--layer-by-layer"]) == 2
    assert "--layer-by-layer calibrates one block at a time" in capsys.readouterr().err
