"""The kron-transformers command line, end to end on a saved tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import build_model, make_inputs
from transformers import AutoModelForSeq2SeqLM

import kron_transformers as kt
from kron_transformers.cli import main


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kron_transformers.cli", *args], capture_output=True, text=True, timeout=300
    )


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command run by ``main`` in this process: no second interpreter start-up (torch, transformers)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


CONFIG_YAML = """
embedding: {method: Word2KetXS, rank: 4}
attention: {method: Shapeshifter, rank: 2}
ffn: {method: KPD, rank: 2, block_size: [2, 2]}
init: svd
"""


def test_compress_report_card_decompress(tmp_path, capsys):
    dense = build_model("t5")
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "cfg.yaml").write_text(CONFIG_YAML)

    result = cli(
        "compress", str(tmp_path / "dense"), "--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "kron")
    )
    assert result.returncode == 0, result.stderr
    assert "model parameters:" in result.stdout and "Word2KetXS" in result.stdout
    assert "compressing" in result.stderr  # progress output
    compressed = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "kron").eval()
    expected = kt.compress_model(
        build_model("t5"),
        kt.KronConfig(
            embedding=kt.Word2KetXS(rank=4), attention=kt.Shapeshifter(rank=2), ffn=kt.KPD(rank=2, block_size=(2, 2))
        ),
    )
    inputs = make_inputs("t5")
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs).logits, expected(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "kron" / "README.md").read_text().startswith("---\nlibrary_name: transformers")

    report = cli_here(capsys, "report", str(tmp_path / "kron"))
    assert report.returncode == 0, report.stderr
    assert str(kt.report(compressed)) == report.stdout.strip()

    (tmp_path / "metrics.json").write_text(json.dumps({"bleu": 3.25}))
    card = cli_here(
        capsys, "card", str(tmp_path / "kron"), "--metrics", str(tmp_path / "metrics.json"), "--repo-id", "me/t5"
    )
    assert card.returncode == 0, card.stderr
    text = (tmp_path / "kron" / "README.md").read_text()
    assert "| bleu | 3.25 |" in text and 'from_pretrained("me/t5")' in text

    result = cli_here(capsys, "decompress", str(tmp_path / "kron"), "--output", str(tmp_path / "plain"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "plain").eval()
    assert isinstance(plain.lm_head, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, compressed(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_bad_input_gives_one_line_and_a_nonzero_exit(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"attention": {"method": "Shapeshifter"}}')
    build_model("bert").save_pretrained(tmp_path / "dense")
    cases = [
        ("report", str(tmp_path / "missing")),
        ("report", str(tmp_path / "dense")),
        (
            "compress",
            str(tmp_path / "dense"),
            "--config",
            str(tmp_path / "nope.yaml"),
            "--output",
            str(tmp_path / "o"),
        ),
        ("compress", str(tmp_path / "dense"), "--config", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o")),
    ]
    results = [cli(*cases[0])] + [cli_here(capsys, *args) for args in cases[1:]]  # one through the entry point
    for args, result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, result.stderr
    assert "is not a kron_transformers checkpoint" in results[1].stderr
    assert "does not exist" in results[2].stderr
    assert "give exactly one of rank= or compression=" in results[3].stderr
