"""CCE (Tsang & Ahle): lookups, bags, tied head, clustering, schedules, entropies, compression factor, checkpoints."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file, save_file
from torch import nn

import kron_transformers as kt
import kron_transformers.cce as cce
from kron_transformers.factorizations.cce import MERSENNE_PRIME, CCEFactorization, column_widths, universal_hash
from kron_transformers.modules import TiedFactorizedHead


BACKENDS = ["sklearn", "faiss"]
VOCAB, DIM, COLUMNS, ROWS = 37, 10, 4, 7  # 10 = 3 + 3 + 2 + 2: uneven column blocks


def explicit_row(table: CCEFactorization, i: int) -> torch.Tensor:
    """The paper's formula, entry by entry: concat_j M_j[h_j(i)] + M'_j[h'_j(i)]."""
    blocks, start = [], 0
    for j, width in enumerate(column_widths(table.cols, table.num_columns)):
        h, g = int(table.pointers[i, j]), int(table.helper_pointers[i, j])
        blocks.append(table.table[h, start : start + width] + table.helper_table[g, start : start + width])
        start += width
    return torch.cat(blocks)


def cce_embedding(**kwargs) -> kt.CCEEmbedding:
    torch.manual_seed(0)
    return kt.CCEEmbedding(VOCAB, DIM, num_columns=COLUMNS, table_rows=ROWS, **kwargs).double()


def test_column_widths_and_hash():
    assert column_widths(10, 4) == [3, 3, 2, 2]
    assert column_widths(8, 4) == [2, 2, 2, 2]
    pointers = universal_hash(1000, 13, 3, seed=5)
    assert pointers.dtype == torch.int32 and pointers.shape == (1000, 3)
    rng = random.Random(5)
    for j in range(3):
        a, b = rng.randrange(1, MERSENNE_PRIME), rng.randrange(0, MERSENNE_PRIME)
        assert pointers[:, j].tolist() == [((a * x + b) % MERSENNE_PRIME) % 13 for x in range(1000)]
    assert torch.equal(pointers, universal_hash(1000, 13, 3, seed=5))
    assert not torch.equal(pointers, universal_hash(1000, 13, 3, seed=6))
    assert torch.bincount(pointers[:, 0].long(), minlength=13).min() > 40  # all buckets used, about evenly


def test_lookup_equals_materialized_and_formula():
    emb = cce_embedding()
    table = emb.factorization
    ids = torch.tensor([[0, 5, 36], [5, 5, 12]])  # 2-D input
    dense = emb.materialize()
    expected = torch.stack([explicit_row(table, i) for i in range(VOCAB)])
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(emb(ids), expected[ids], rtol=0, atol=1e-14)
    torch.testing.assert_close(emb.weight, dense, rtol=0, atol=0)
    assert emb(ids).shape == (2, 3, DIM)
    assert emb.num_parameters() == 2 * ROWS * DIM == sum(p.numel() for p in emb.parameters())


def test_gradients_match_autograd_through_materialize():
    emb = cce_embedding()
    ids = torch.tensor([[1, 2, 2, 30], [0, 36, 1, 1]])
    cotangent = torch.randn(2, 4, DIM, dtype=torch.float64)
    (emb(ids) * cotangent).sum().backward()
    ours = [p.grad.clone() for p in (emb.factorization.table, emb.factorization.helper_table)]
    emb.zero_grad()
    (emb.materialize()[ids] * cotangent).sum().backward()
    for mine, reference in zip(ours, (emb.factorization.table.grad, emb.factorization.helper_table.grad)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12)
        assert mine.abs().sum() > 0


def test_padding_idx_row_is_zero_and_gets_no_gradient():
    emb = cce_embedding(padding_idx=3)
    out = emb(torch.tensor([3, 4, 3]))
    assert torch.equal(out[0], torch.zeros(DIM, dtype=torch.float64)) and out[1].abs().sum() > 0
    out[0].sum().backward()
    assert emb.factorization.table.grad.abs().sum() == 0
    assert torch.equal(emb.materialize()[3], torch.zeros(DIM, dtype=torch.float64))


@pytest.mark.parametrize("columns", [2, 5])  # 2c < dim: per-column products; 2c >= dim: dense fallback
def test_tied_head_matmul(columns):
    torch.manual_seed(1)
    emb = kt.CCEEmbedding(VOCAB, DIM, num_columns=columns, table_rows=ROWS, padding_idx=0).double()
    head = TiedFactorizedHead(emb)
    x = torch.randn(3, 2, DIM, dtype=torch.float64, requires_grad=True)
    logits = head(x)
    reference = x @ emb.materialize().T
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-12)
    cotangent = torch.randn_like(logits)
    grads = torch.autograd.grad((logits * cotangent).sum(), [x, emb.factorization.table])
    reference_grads = torch.autograd.grad((reference * cotangent).sum(), [x, emb.factorization.table])
    for mine, expected in zip(grads, reference_grads):
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-12)


BAG_CASES = [
    # (input, offsets, weighted, mode, padding_idx, include_last_offset)
    ([3, 3, 7, 0, 36, 3], [0, 2, 2, 5], False, "sum", None, False),  # an empty bag
    ([3, 3, 7, 0, 36, 3], [0, 2, 2, 5], False, "mean", None, False),
    ([3, 3, 7, 0, 36, 3], [0, 3, 4], False, "max", None, False),
    ([3, 3, 7, 0, 36, 3], [0, 2, 5], True, "sum", None, False),
    ([4, 3, 4, 4, 9, 4], [0, 2, 4], False, "mean", 4, False),
    ([1, 2, 3, 4, 5], [0, 2, 5], False, "sum", None, True),
    ([[1, 2, 2], [5, 5, 5], [36, 0, 1]], None, False, "mean", None, False),
    ([[1, 2, 2], [4, 4, 4], [36, 4, 1]], None, True, "sum", 4, False),
    ([], [0, 0], False, "sum", None, False),
]


@pytest.mark.parametrize(("ids", "offsets", "weighted", "mode", "padding_idx", "last"), BAG_CASES)
def test_bag_matches_embedding_bag_on_materialized_table(ids, offsets, weighted, mode, padding_idx, last):
    torch.manual_seed(2)
    bag = kt.CCEEmbeddingBag(
        VOCAB, DIM, num_columns=COLUMNS, table_rows=ROWS, mode=mode, padding_idx=padding_idx, include_last_offset=last
    ).double()
    input = torch.tensor(ids, dtype=torch.long)
    offsets = None if offsets is None else torch.tensor(offsets)
    weights = torch.rand(input.shape, dtype=torch.float64) if weighted else None
    ours = bag(input, offsets, weights)
    table = bag.materialize()
    reference = F.embedding_bag(
        input, table, offsets, mode=mode, per_sample_weights=weights, padding_idx=padding_idx, include_last_offset=last
    )
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    if ours.numel():
        cotangent = torch.randn_like(ours)
        mine = torch.autograd.grad((ours * cotangent).sum(), bag.factorization.table)[0]
        expected = torch.autograd.grad((reference * cotangent).sum(), bag.factorization.table)[0]
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-12)


def test_pointers_are_int32_buffers_in_state_dict_and_safetensors(tmp_path):
    bag = kt.CCEEmbeddingBag(VOCAB, DIM, table_rows=ROWS, mode="sum")
    state = bag.state_dict()
    assert state["factorization.pointers"].dtype == torch.int32
    assert state["factorization.helper_pointers"].shape == (VOCAB, 4)
    assert {name for name, _ in bag.named_parameters()} == {"factorization.table", "factorization.helper_table"}
    cce.cluster(bag, seed=0, niter=5)  # pointers no longer the seed's hashes
    save_file(state, str(tmp_path / "bag.safetensors"))
    loaded = load_file(str(tmp_path / "bag.safetensors"))
    other = kt.CCEEmbeddingBag(VOCAB, DIM, table_rows=ROWS, mode="sum", seed=9)
    other.load_state_dict(loaded)
    assert torch.equal(other.materialize(), bag.materialize())
    assert other.factorization.pointers.dtype == torch.int32


def planted_table(rows: int, dim: int, columns: int, clusters: int, noise: float) -> torch.Tensor:
    """Each column block of each row is one of ``clusters`` centres plus small noise."""
    generator = torch.Generator().manual_seed(0)
    blocks = []
    for width in column_widths(dim, columns):
        centres = torch.randn(clusters, width, generator=generator, dtype=torch.float64)
        blocks.append(centres[torch.randint(0, clusters, (rows,), generator=generator)])
    table = torch.cat(blocks, dim=1)
    return table + noise * torch.randn(table.shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clustering_recovers_a_planted_cluster_table(backend):
    target = planted_table(400, 12, 3, clusters=6, noise=0.01)
    table = CCEFactorization(400, 12, 3, 12).double()  # k-means from a random start: more centroids than centres
    hashed = table.pointers.clone()
    buckets_only = torch.zeros_like(target)  # best table for the random pointers with M' = 0: bucket means
    for j, block in enumerate(table.column_slices()):
        ids = hashed[:, j].long()
        sums = torch.zeros(12, block.stop - block.start, dtype=torch.float64).index_add_(0, ids, target[:, block])
        buckets_only[:, block] = (sums / torch.bincount(ids, minlength=12).clamp_min(1).unsqueeze(-1))[ids]
    hashed_error = float((target - buckets_only).norm() / target.norm())
    table.cluster_table(target, backend=backend, seed=0, helper_init="zero")
    error = table.relative_error(target)
    assert hashed_error > 0.5 and error < 0.05
    assert torch.equal(table.helper_table, torch.zeros_like(table.helper_table))
    assert table.pointers.dtype == torch.int32 and not torch.equal(table.pointers, hashed)
    table.cluster_table(target, backend=backend, seed=0, helper_init="residual")
    assert table.relative_error(target) <= error + 1e-12  # least-squares M' only lowers the error


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_clusters_than_distinct_points_gives_no_nan(backend):
    distinct = torch.randn(3, 6, dtype=torch.float64)
    target = distinct[torch.arange(20) % 3]
    table = CCEFactorization(20, 6, 2, 8).double()
    for helper_init in ("zero", "residual"):
        table.cluster_table(target, backend=backend, seed=1, helper_init=helper_init)
        assert torch.isfinite(table.table).all() and torch.isfinite(table.helper_table).all()
        assert table.relative_error(target) < 1e-2  # faiss splits empty clusters with a tiny perturbation
    small = CCEFactorization(5, 4, 2, 5).double()  # as many clusters as rows
    small.cluster_table(torch.randn(5, 4, dtype=torch.float64), backend=backend)
    assert torch.isfinite(small.materialize()).all()


def test_cluster_resets_optimizer_state_to_a_fresh_start():
    emb = cce_embedding()
    model = nn.Sequential(emb, nn.Linear(DIM, 1).double())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for _ in range(3):
        optimizer.zero_grad()
        model(ids).sum().backward()
        optimizer.step()
    linear_state = {k: v.clone() for k, v in optimizer.state[model[1].weight].items()}
    metrics = cce.cluster(model, optimizer, seed=0, niter=10, backend="sklearn")
    assert set(metrics) == {"0.h1", "0.h2", "0.kmeans_error"}
    for parameter in (emb.factorization.table, emb.factorization.helper_table):
        assert all(float(v.abs().sum()) == 0 for v in optimizer.state[parameter].values())
    for key, value in optimizer.state[model[1].weight].items():  # other parameters keep their state
        assert torch.equal(value, linear_state[key])
    start = {name: p.detach().clone() for name, p in emb.factorization.named_parameters()}
    optimizer.zero_grad()
    model(ids).sum().backward()
    grads = {name: p.grad.clone() for name, p in emb.factorization.named_parameters()}
    optimizer.step()
    for name, parameter in emb.factorization.named_parameters():  # equals Adam's first step from no state
        fresh = nn.Parameter(start[name].clone())
        fresh.grad = grads[name]
        torch.optim.Adam([fresh], lr=0.1).step()
        torch.testing.assert_close(parameter.detach(), fresh.detach(), rtol=0, atol=1e-12)


def test_schedule_steps():
    assert [s for s in range(1, 12) if cce.ClusterSchedule(every=3, count=2).fires(s)] == [3, 6]
    assert [s for s in range(1, 12) if cce.ClusterSchedule(every=4).fires(s)] == [4, 8]
    assert [s for s in range(1, 12) if cce.ClusterSchedule(steps=[7, 2]).fires(s)] == [2, 7]
    half = cce.ClusterSchedule(steps_per_epoch=10)  # default: once at half an epoch
    assert [s for s in range(1, 30) if half.fires(s)] == [5]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cce.ClusterSchedule(epoch_fractions=[0.5]).fires(3)


def tiny_model() -> nn.Module:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = kt.CCEEmbeddingBag(VOCAB, DIM, table_rows=ROWS, mode="mean")
            self.out = nn.Linear(DIM, 1)

        def forward(self, input_ids, labels=None):
            logits = self.out(self.embedding(input_ids)).squeeze(-1)
            return {"loss": F.binary_cross_entropy_with_logits(logits, labels), "logits": logits}

    torch.manual_seed(0)
    return Tiny()


def record_clusterings(monkeypatch) -> list[int]:
    steps, real = [], cce.cluster

    def recording(module, optimizer=None, **options):
        steps.append(module.last_clustered_step)
        assert optimizer is not None
        return real(module, optimizer, **options)

    monkeypatch.setattr(cce, "cluster", recording)
    return steps


def test_plain_hook_clusters_at_scheduled_steps(monkeypatch):
    steps = record_clusterings(monkeypatch)
    model = tiny_model()
    assert cce.schedule_clustering(model, cce.ClusterSchedule(every=2, count=2), niter=5, seed=0) == 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = {}
    for step in range(1, 7):
        batch = torch.randint(0, VOCAB, (4, 3))
        optimizer.zero_grad()
        model(batch, torch.ones(4))["loss"].backward()
        optimizer.step()
        metrics = kt.on_train_step(model, step, optimizer)
        kt.on_train_step(model, step, optimizer)  # a second runner at the same step does not cluster again
        logged.update({step: metrics} if metrics else {})
    assert steps == [2, 4] and sorted(logged) == [2, 4]
    assert set(logged[2]) == {"embedding.h1", "embedding.h2", "embedding.kmeans_error"}


def test_trainer_callback_clusters_at_epoch_fractions(monkeypatch, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    steps = record_clusterings(monkeypatch)
    model = tiny_model()
    data = [{"input_ids": torch.randint(0, VOCAB, (3,)), "labels": torch.tensor(float(i % 2))} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    callback = cce.CCEClusteringCallback(cce.ClusterSchedule(epoch_fractions=[0.5, 1.5]), niter=5, seed=0)
    logged = []

    class Recorder(TrainerCallback):  # runs after the clustering callback has added its metrics to the logs
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "embedding.h1" in logs:
                logged.append(state.global_step)

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Recorder()])
    trainer.train()
    assert steps == [2, 6]  # 4 steps per epoch
    assert logged == [2, 6]


def test_entropies_on_known_pointers():
    balanced = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.int32)
    entropies = cce.table_entropies(balanced)
    assert entropies["h1"] == pytest.approx(math.log(2)) and entropies["h2"] == pytest.approx(math.log(4))
    collapsed = torch.tensor([[1, 0, 0], [1, 1, 2], [1, 0, 3], [1, 3, 1]])  # appendix G: column 1 collapsed
    assert cce.table_entropies(collapsed)["h1"] == 0.0
    permuted = torch.tensor([[1, 0, 1], [2, 2, 3], [1, 0, 3], [3, 1, 0], [2, 2, 1]])  # column 2 permutes column 1
    entropies = cce.table_entropies(permuted)
    column_one = -(2 / 5 * math.log(2 / 5) * 2 + 1 / 5 * math.log(1 / 5))
    assert entropies["h1"] == pytest.approx(column_one) and entropies["h2"] == pytest.approx(column_one)
    # (1, 0) and (0, 1) collide under the paper's h_j1 + max(h_j1) h_j2; they must count as two pairs here
    assert cce.table_entropies(torch.tensor([[1, 0], [0, 1]]))["h2"] == pytest.approx(math.log(2))
    assert "h2" not in cce.table_entropies(torch.tensor([[0], [1]]))
    assert cce.table_entropies(cce_embedding())["h1"] > 0


def test_compression_factor_on_known_tables():
    paper = cce.embedding_compression_factor([(10, 16, 160), (100, 16, 1600), (10**6, 16, 8000)])
    assert paper.all_tables == pytest.approx((10 + 100 + 10**6) / (10 + 100 + 500))
    assert paper.largest_table == pytest.approx(2000.0)
    model = nn.ModuleDict(
        {
            "small": nn.Embedding(10, 8),
            "bag": nn.EmbeddingBag(30, 8),
            "large": kt.CCEEmbeddingBag(1000, 8, table_rows=25),
        }
    )
    model["alias"] = model["small"]  # shared tables count once
    factor = cce.embedding_compression_factor(model)
    assert factor.tables == 3
    assert factor.all_tables == pytest.approx((10 + 30 + 1000) * 8 / ((10 + 30) * 8 + 2 * 25 * 8))
    assert factor.largest_table == pytest.approx(1000 / 50)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "bart", "llama"])
def test_compress_model_round_trip(arch, tmp_path):
    model = build_model(arch)
    dense_logits = model(**make_inputs(arch)).logits.detach()
    kt.compress_model(model, kt.KronConfig(embedding=kt.CCE(num_columns=4, table_rows=12)))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, kt.CCEEmbedding) and isinstance(head, kt.TiedFactorizedHead)
    assert head.factorization is embedding.factorization
    inputs = make_inputs(arch)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == dense_logits.shape
    record = next(iter(kt.applied_config(model).modules.values()))
    assert record["init"] == "svd" and 0 < record["init_error"] < 1  # k-means of the dense table
    text = str(kt.report(model))
    assert "CCE" in text and "4 columns, 12 rows" in text and "embedding compression (Tsang & Ahle)" in text
    assert cce.schedule_clustering(model, cce.ClusterSchedule(steps=[1]), niter=5) == 1  # T5: 3 modules, 1 table
    assert len(kt.on_train_step(model, 1)) == 3  # h1, h2, kmeans_error of the one table
    with torch.no_grad():
        logits = model(**inputs).logits
    state = model.state_dict()
    pointer_keys = [key for key in state if key.endswith("pointers")]
    assert len(pointer_keys) == 2 and all(state[key].dtype == torch.int32 for key in pointer_keys)  # saved once
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) >= set(pointer_keys)
    reloaded = ARCHITECTURES[arch][0].from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().factorization is reloaded.get_input_embeddings().factorization
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=0)
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == state.keys()
    assert all(torch.equal(reloaded_state[key], value) for key, value in state.items())
    kt.decompress_model(reloaded)
    assert isinstance(reloaded.get_input_embeddings(), nn.Embedding)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=1e-5, atol=1e-6)


def test_spec_resolution():
    assert kt.CCE().resolve(30522, 768, "embedding", "emb") == {
        "factorization": "cce",
        "num_columns": 4,
        "table_rows": 175,
        "seed": 0,
    }
    assert kt.CCE(compression=100).resolve(10**6, 64, "embedding", "emb")["table_rows"] == 5000
    config = kt.KronConfig.from_dict(kt.KronConfig(embedding=kt.CCE(num_columns=2, table_rows=9)).to_dict())
    assert config.embedding == kt.CCE(num_columns=2, table_rows=9)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: kt.CCEEmbedding(10, 3, num_columns=4), "num_columns must be in \\[1, 3\\]"),
        (lambda: kt.CCEEmbedding(10, 8, table_rows=11), "table_rows must be in \\[1, 10\\]"),
        (lambda: kt.CCEEmbeddingBag(10, 8, mode="median"), "is not one of"),
        (lambda: kt.CCEEmbeddingBag(10, 8, padding_idx=10), "padding_idx 10 is outside"),
        (lambda: kt.CCE(rank=2), "there is no rank"),
        (lambda: kt.CCE(table_rows=5, compression=10), "not both"),
        (lambda: kt.CCE(num_columns=0), "num_columns must be a positive int"),
        (lambda: kt.CCE(num_columns=64).resolve(100, 32, "embedding", "emb"), "num_columns=64 exceeds"),
        (lambda: kt.CCE().resolve(100, 32, "linear", "attn.q"), "applies to embedding layers only"),
        (lambda: cce.cluster(nn.Linear(3, 3)), "holds no CCE table"),
        (lambda: cce.cluster(cce_embedding(), backend="torch"), "backend must be one of"),
        (lambda: cce.cluster(cce_embedding(), helper_init="mean"), "helper_init must be one of"),
        (lambda: cce.schedule_clustering(nn.Linear(3, 3), cce.ClusterSchedule(every=2)), "has no CCE module"),
        (lambda: cce.ClusterSchedule(every=2, steps=[3]), "give one of"),
        (lambda: cce.ClusterSchedule(count=2, epoch_fractions=[0.5]), "count= only applies with every="),
        (lambda: cce.table_entropies(torch.rand(4, 2)), "integer pointers"),
        (lambda: cce.embedding_compression_factor([]), "no embedding tables"),
        (lambda: cce_embedding().factorization.cluster_table(torch.zeros(3, 3)), "needs a \\(37, 10\\) table"),
    ],
)
def test_clear_errors(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_bag_input_errors_name_the_module():
    bag = kt.CCEEmbeddingBag(10, 8, table_rows=3)
    with pytest.raises(ValueError, match="CCEEmbeddingBag: 1-D input"):
        bag(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="CCEEmbeddingBag: input must hold int32/int64 ids"):
        bag(torch.tensor([[1.0, 2.0]]))
