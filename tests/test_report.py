"""``kt.report`` and ``kron-transformers report`` list modules in model order and say which norm each error is."""

from __future__ import annotations

from conftest import build_model

import kron_transformers as kt
from kron_transformers.integration.checkpoint import load_structure
from kron_transformers.integration.model_card import render_model_card
from kron_transformers.report import INIT_ERROR_LEGEND


SPECS = dict(embedding=kt.Word2KetXS(rank=2), attention=kt.Shapeshifter(rank=2), ffn=kt.LowRank(rank=2))
CONFIG = kt.KronConfig(**SPECS)


def test_rows_follow_the_model_order_in_memory_and_from_config_json(tmp_path):
    model = kt.compress_model(build_model("bert"), CONFIG)
    order = [name for name, _ in model.named_modules()]
    names = [row.name for row in kt.report(model).modules]
    assert names == sorted(names, key=order.index) and names != sorted(names)
    model.save_pretrained(tmp_path)
    assert str(kt.report(load_structure(tmp_path))) == str(kt.report(model))  # what the CLI prints


def test_error_columns_name_their_norm_and_random_init_has_none():
    text = str(kt.report(kt.compress_model(build_model("bert"), CONFIG)))
    assert "init error" in text.splitlines()[0] and INIT_ERROR_LEGEND in text and "||W - W_hat||_F" in text
    random_init = kt.compress_model(build_model("bert"), kt.KronConfig(**SPECS, init="random"))
    assert "init error" not in str(kt.report(random_init))


def test_an_untied_head_counts_against_the_dense_model_that_held_one_table(tmp_path):
    dense_parameters = sum(p.numel() for p in build_model("t5").parameters())  # the tied table counted once
    dense_head = kt.compress_model(
        build_model("t5"), kt.KronConfig(embedding=kt.Word2KetXS(rank=4), untie_lm_head=True)
    )
    summary = kt.report(dense_head)
    assert summary.total_before == dense_parameters and summary.untied == {"lm_head": "shared"}
    assert summary.total_after == dense_parameters + sum(row.compressed_parameters for row in summary.modules)
    text = str(summary)
    assert "lm_head: untied from shared (untie_lm_head), its own weight, dense" in text and "x larger)" in text
    card = render_model_card(dense_head)
    assert "`lm_head` was tied to `shared` and has its own weight (`untie_lm_head=True`)" in card
    factorized_head = kt.compress_model(
        build_model("t5"),
        kt.KronConfig(embedding=kt.Word2KetXS(rank=4), lm_head=kt.LowRank(rank=2), untie_lm_head=True),
    )
    summary = kt.report(factorized_head)
    assert summary.total_before == dense_parameters
    assert "its own weight, compressed above" in str(summary) and "x smaller)" in str(summary)
    factorized_head.save_pretrained(tmp_path)
    assert str(kt.report(load_structure(tmp_path))) == str(summary)
