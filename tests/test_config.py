"""Spec and KronConfig validation, resolution and serialization."""

from __future__ import annotations

import json
import math

import pytest

import kron_transformers as kt
from kron_transformers.config import EMBEDDING, LINEAR, optimal_kpd_block


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: kt.Shapeshifter(), "give exactly one of rank= or compression="),
        (lambda: kt.Shapeshifter(rank=2, compression=10), "give exactly one of rank= or compression="),
        (lambda: kt.Shapeshifter(rank=0), "rank must be a positive int"),
        (lambda: kt.LowRank(compression=0.5), "compression must be a number > 1"),
        (lambda: kt.Kronecker(rank=2, order=1), "order must be an int >= 2"),
        (lambda: kt.Kronecker(rank=2, order=3, factor_shapes=[(2, 2), (2, 2)]), "2 factor shapes given for order 3"),
        (lambda: kt.PHM(n=4, rank=2), "the rank is n"),
        (lambda: kt.KPD(rank=2, block_size=(4,)), "a block size must be two positive ints"),
        (lambda: kt.Word2Ket(rank=1, order=2, leaf_dims=[4]), "1 leaf dims given for order 2"),
        (lambda: kt.KronConfig(), "no method given"),
        (lambda: kt.KronConfig(attention=kt.Shapeshifter(rank=2), init="kaiming"), "expected one of"),
        (lambda: kt.KronConfig(attention="shapeshifter"), "expected a method spec"),
        (lambda: kt.KronConfig(ffn=kt.LowRank(rank=2), calibration_time_ratio=0), "positive number or None"),
        (lambda: kt.KronConfig(ffn=kt.LowRank(rank=2), calibration_time_ratio="fast"), "positive number or None"),
        (lambda: kt.KronConfig(embedding=kt.LowRank(rank=2), untie_lm_head="yes"), "untie_lm_head: expected True"),
    ],
)
def test_invalid_specs_raise_clear_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize(
    "spec, target, message",
    [
        (kt.Shapeshifter(rank=800), LINEAR, r"rank 800 exceeds the maximum 768 for a 768x768 matrix"),
        (kt.Word2KetXS(rank=2), LINEAR, "Word2KetXS applies to embedding layers only"),
        (kt.KPD(rank=2), EMBEDDING, "KPD applies to linear layers only"),
        (kt.PHM(n=5), LINEAR, "PHM n=5 needs both dimensions"),
        (kt.KPD(rank=2, block_size=(5, 5)), LINEAR, r"block size \(5, 5\) does not tile the 768x768 weight"),
        (kt.Kronecker(rank=2, factor_shapes=[(10, 10), (10, 10)]), LINEAR, "smaller than the 768x768 weight"),
    ],
)
def test_resolve_rejects_what_cannot_be_built(spec, target, message):
    with pytest.raises(ValueError, match=message) as error:
        spec.resolve(768, 768, target, "encoder.layer.0.attention.self.query")
    assert "encoder.layer.0.attention.self.query" in str(error.value)


def test_shapeshifter_resolves_balanced_shapes():
    structure = kt.Shapeshifter(rank=16).resolve(512, 2048, LINEAR, "ffn")
    assert structure == {"factorization": "kronecker_sum", "factor_shapes": [[16, 64], [32, 32]], "rank": 16}


def test_phm_first_factor_is_n_by_n():
    structure = kt.PHM(n=4).resolve(64, 32, LINEAR, "layer")
    assert structure["factor_shapes"] == [[4, 4], [16, 8]] and structure["rank"] == 4


@pytest.mark.parametrize(
    "spec",
    [
        kt.Shapeshifter(compression=20),
        kt.LowRank(compression=20),
        kt.KPD(compression=20),
        kt.Kronecker(order=3, compression=20),
    ],
)
def test_compression_picks_the_largest_rank_within_budget(spec):
    structure = spec.resolve(768, 3072, LINEAR, "layer")
    rank = structure["rank"]
    assert rank > 1
    assert 768 * 3072 / _parameters(structure, 768, 3072) >= 20
    one_more = spec.resolve(768, 3072, LINEAR, "layer") | {"rank": rank + 1}
    if "block_size" in structure:  # eq. 5's block depends on the rank: resolve it for rank + 1
        one_more = kt.KPD(rank=rank + 1).resolve(768, 3072, LINEAR, "layer")
    assert 768 * 3072 / _parameters(one_more, 768, 3072) < 20


def _parameters(structure, rows, cols):
    from kron_transformers.factorizations import build_factorization

    return build_factorization(structure, rows, cols).num_parameters()


def test_optimal_kpd_block_matches_seed_001_example_1():
    """Zhu et al., Example 1: m = 2^3, n = 2^8, rank 1 -> m1 n1 = 32 and 128 parameters."""
    m2, n2 = optimal_kpd_block(8, 256, 1)
    m1, n1 = 8 // m2, 256 // n2
    assert m1 * n1 == 32
    assert 2 * m1 * n1 + m2 * n2 == 128


def test_kron_config_round_trips_through_json():
    config = kt.KronConfig(
        embedding=kt.Word2KetXS(order=2, rank=8),
        attention=kt.Shapeshifter(rank=4),
        ffn=kt.KPD(rank=2, block_size=(4, 4)),
        rules={"lm_head": kt.LowRank(rank=3), "pooler": None},
        target_modules=["q", "v"],
        exclude_modules="decoder.*",
        init="random",
        untie_lm_head=True,
    )
    text = config.to_json_string()
    json.loads(text)
    again = kt.KronConfig.from_json_string(text)
    assert again == config
    assert isinstance(again.ffn, kt.KPD) and again.ffn.block_size == [4, 4]
    assert again.rules["pooler"] is None


def test_word2ket_rank_is_bounded_by_leaf_dims():
    with pytest.raises(ValueError, match="rank 17 exceeds the maximum 16"):
        kt.Word2Ket(rank=17, order=2).resolve(100, 256, EMBEDDING, "embed")
    assert kt.Word2Ket(rank=2, order=4).resolve(100, 256, EMBEDDING, "embed")["leaf_dims"] == [4, 4, 4, 4]
    assert math.prod(kt.Word2Ket(rank=2, order=2).resolve(10, 768, EMBEDDING, "e")["leaf_dims"]) == 768
