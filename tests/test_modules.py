"""Drop-in behaviour of the modules: same outputs as the dense module they stand for."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import kron_transformers as kt
from kron_transformers.modules import CONV1D_LAYOUT, FactorizedEmbedding, FactorizedLinear


LINEAR_CASES = {
    "kron": lambda: kt.KronLinear(11, 7, rank=3, factor_shapes=[(2, 3), (4, 4)]),
    "kron_balanced": lambda: kt.KronLinear(24, 36, rank=2),
    "kron_order3": lambda: kt.KronLinear(12, 8, rank=2, order=3),
    "kpd": lambda: kt.KPDLinear(10, 12, rank=3, block_size=(3, 2)),
    "low_rank": lambda: kt.LowRankLinear(13, 9, rank=4),
    "no_bias": lambda: kt.KronLinear(11, 7, rank=2, factor_shapes=[(2, 3), (4, 4)], bias=False),
}

EMBEDDING_CASES = {
    "word2ketxs": lambda: kt.KronEmbedding(50, 12, rank=3, padding_idx=4),
    "word2ketxs_order3": lambda: kt.KronEmbedding(61, 8, rank=2, order=3),
    "word2ket": lambda: kt.Word2KetEmbedding(20, 12, rank=2, padding_idx=0),
    "word2ket_layernorm": lambda: kt.Word2KetEmbedding(20, 16, rank=2, order=4, layer_norm=True),
    "low_rank": lambda: kt.LowRankEmbedding(30, 10, rank=3, padding_idx=29),
}


def randomized(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return module


@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_linear_equals_nn_linear_with_materialized_weight(name):
    layer = randomized(LINEAR_CASES[name]())
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None).double()
    with torch.no_grad():
        dense.weight.copy_(layer.materialize())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-10)
    assert layer.weight.shape == dense.weight.shape
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())


def test_conv1d_layout_matches_transformers_conv1d():
    layer = randomized(FactorizedLinear.wrap(kt.KronLinear(8, 12, rank=2).factorization, True, CONV1D_LAYOUT))
    dense = Conv1D(12, 8).double()
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    assert layer.weight.shape == (8, 12)  # (in, out) like Conv1D
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(EMBEDDING_CASES))
def test_embedding_equals_nn_embedding(name):
    embedding = randomized(EMBEDDING_CASES[name]())
    dense = nn.Embedding.from_pretrained(
        embedding.materialize().detach(), freeze=False, padding_idx=embedding.padding_idx
    )
    ids = torch.randint(0, embedding.num_embeddings, (3, 9))
    if embedding.padding_idx is not None:
        ids[0, 0] = embedding.padding_idx
    torch.testing.assert_close(embedding(ids), dense(ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["word2ketxs", "word2ket", "low_rank"])
def test_padding_row_is_zero_and_gets_no_gradient(name):
    embedding = randomized(EMBEDDING_CASES[name]())
    pad = embedding.padding_idx
    assert torch.count_nonzero(embedding.materialize()[pad]) == 0
    ids = torch.full((4,), pad)
    output = embedding(ids)
    assert torch.count_nonzero(output) == 0
    output.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in embedding.parameters())


def test_embed_scale_multiplies_rows():
    embedding = randomized(kt.KronEmbedding(50, 12, rank=2))
    scaled = FactorizedEmbedding.wrap(embedding.factorization, None, 3.5)
    ids = torch.tensor([1, 7, 49])
    torch.testing.assert_close(scaled(ids), 3.5 * embedding(ids))


@pytest.mark.parametrize("name", ["word2ketxs", "word2ket", "low_rank"])
def test_tied_head_logits_equal_dense_and_share_factors(name):
    embedding = randomized(EMBEDDING_CASES[name]())
    bias = nn.Parameter(torch.randn(embedding.num_embeddings, dtype=torch.float64))
    head = kt.TiedFactorizedHead(embedding, bias)
    hidden = torch.randn(2, 3, embedding.embedding_dim, dtype=torch.float64)
    torch.testing.assert_close(head(hidden), hidden @ embedding.materialize().T + bias, rtol=0, atol=1e-10)
    assert head.factorization is embedding.factorization
    assert head.num_parameters() == embedding.num_embeddings  # only the bias is its own


def test_tied_head_of_kronecker_embedding_never_forms_the_table(monkeypatch):
    embedding = randomized(kt.KronEmbedding(4096, 64, rank=2))
    head = kt.TiedFactorizedHead(embedding)
    hidden = torch.randn(3, 64, dtype=torch.float64)
    expected = hidden @ embedding.materialize().T

    def forbidden(*args, **kwargs):
        raise AssertionError("the vocab x dim table was formed")

    import kron_transformers.factorizations.kronecker as kronecker

    monkeypatch.setattr(kronecker, "kron_materialize", forbidden)
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_linear_rebuilds_from_structure(name):
    layer = LINEAR_CASES[name]()
    rebuilt = FactorizedLinear.from_structure(
        layer.factorization.structure(), layer.in_features, layer.out_features, layer.bias is not None
    )
    assert type(rebuilt) is type(layer)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EMBEDDING_CASES))
def test_embedding_rebuilds_from_structure(name):
    embedding = EMBEDDING_CASES[name]()
    rebuilt = FactorizedEmbedding.from_structure(
        embedding.factorization.structure(), embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx
    )
    assert type(rebuilt) is type(embedding)
    rebuilt.load_state_dict(embedding.state_dict())
    ids = torch.arange(embedding.num_embeddings)
    torch.testing.assert_close(rebuilt(ids), embedding(ids), rtol=0, atol=0)


def test_repr_names_the_structure():
    text = repr(kt.KPDLinear(8, 12, rank=2, block_size=(4, 2)))
    assert "block_size=[4, 2]" in text and "rank=2" in text and "in_features=8" in text


def test_bad_padding_idx_is_rejected():
    with pytest.raises(ValueError, match="padding_idx 50 is outside the vocabulary of 50 rows"):
        kt.KronEmbedding(50, 12, rank=2, padding_idx=50)
