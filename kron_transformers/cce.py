"""CCE training support: clustering, its schedule, table-collapse entropies, the compression measure (Tsang & Ahle).

```py
import kron_transformers as kt
model = kt.compress_model(model, kt.KronConfig(embedding=kt.CCE()))
trainer = Trainer(model, ..., callbacks=[kt.cce.CCEClusteringCallback(kt.cce.ClusterSchedule(every=1000, count=2))])
# or in a plain loop, after optimizer.step():  kt.cce.cluster(model, optimizer)
```
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .factorizations.cce import HELPER_INITS, CCEFactorization
from .factorizations.kmeans import resolve_backend
from .training import KronTrainingCallback


logger = logging.getLogger(__name__)


@dataclass
class ClusterSchedule:
    """When to re-cluster, counted in optimizer steps (Tsang & Ahle, appendix E, Figure 8).

    Give one of ``steps`` (explicit), ``every`` (+ optional ``count``: the paper's "ct2 cf75000"
    is ``every=75000, count=2``) or ``epoch_fractions`` (``[0.5]``: "CCE half", one clustering at
    half an epoch; needs ``steps_per_epoch``, which ``CCEClusteringCallback`` fills in from the
    Trainer). With no argument: one clustering at half an epoch. The paper's finding: finish
    clustering early and let the model train afterwards (Figure 8c).
    """

    steps: list[int] | None = field(default=None, metadata={"help": "Optimizer steps after which to cluster."})
    every: int | None = field(default=None, metadata={"help": "Cluster after every `every` optimizer steps."})
    count: int | None = field(default=None, metadata={"help": "With `every`: stop after this many clusterings."})
    epoch_fractions: list[float] | None = field(
        default=None, metadata={"help": "Cluster at these fractions of an epoch (0.5 = half an epoch)."}
    )
    steps_per_epoch: int | None = field(default=None, metadata={"help": "Optimizer steps per epoch."})

    def __post_init__(self) -> None:
        given = [name for name in ("steps", "every", "epoch_fractions") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"ClusterSchedule: give one of steps=, every= or epoch_fractions=, got {given}")
        if not given:
            self.epoch_fractions = [0.5]
        if self.steps is not None:
            self.steps = sorted({int(step) for step in self.steps})
            if not self.steps or self.steps[0] < 1:
                raise ValueError(f"ClusterSchedule: steps must be a non-empty list of ints >= 1, got {self.steps}")
        for name in ("every", "count", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ClusterSchedule: {name} must be an int >= 1, got {value!r}")
        if self.count is not None and self.every is None:
            raise ValueError("ClusterSchedule: count= only applies with every=")
        if self.epoch_fractions is not None:
            self.epoch_fractions = [float(f) for f in self.epoch_fractions]
            if not self.epoch_fractions or min(self.epoch_fractions) <= 0:
                raise ValueError(f"ClusterSchedule: epoch_fractions must be positive, got {self.epoch_fractions}")

    def fires(self, step: int) -> bool:
        """Whether to cluster after optimizer step ``step`` (1 = after the first step)."""
        if self.steps is not None:
            return step in self.steps
        if self.every is not None:
            return step > 0 and step % self.every == 0 and (self.count is None or step // self.every <= self.count)
        if self.steps_per_epoch is None:
            raise ValueError(
                "ClusterSchedule(epoch_fractions=...) needs steps_per_epoch=; CCEClusteringCallback sets it from "
                "the Trainer, a plain loop must pass it"
            )
        return step in {max(1, round(f * self.steps_per_epoch)) for f in self.epoch_fractions}


class ClusteringHook:
    """Mixin of the CCE modules: ``on_train_step`` clusters when ``cluster_schedule`` fires.

    ``kt.on_train_step(model, step, optimizer)`` and ``kt.KronTrainingCallback`` call it after
    each optimizer step (ARCHITECTURE.md layer 7); ``schedule_clustering`` sets the schedule.
    """

    cluster_schedule: ClusterSchedule | None = None
    cluster_options: dict | None = None
    last_clustered_step: int | None = None

    def on_train_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float] | None:
        if self.cluster_schedule is None or step == self.last_clustered_step or not self.cluster_schedule.fires(step):
            return None
        self.last_clustered_step = step  # a second hook runner at the same step does not cluster twice
        return cluster(self, optimizer, **(self.cluster_options or {}))


def schedule_clustering(model: nn.Module, schedule: ClusterSchedule | None, **cluster_options) -> int:
    """Attach ``schedule`` (and ``cluster`` keyword options) to every CCE table of ``model``; returns how many.

    ``None`` removes the schedules. Raises when the model has no CCE module.
    """
    if schedule is not None and not isinstance(schedule, ClusterSchedule):
        raise TypeError(f"schedule_clustering: expected a ClusterSchedule, got {type(schedule).__name__}")
    unknown = set(cluster_options) - {"backend", "niter", "max_points_per_centroid", "seed", "helper_init"}
    if unknown:
        raise TypeError(f"schedule_clustering: unknown cluster options {sorted(unknown)}")
    hooks = [module for module in model.modules() if isinstance(module, ClusteringHook)]
    if not hooks:
        raise ValueError(
            f"schedule_clustering: {type(model).__name__} has no CCE module (CCEEmbedding/CCEEmbeddingBag)"
        )
    scheduled: set[int] = set()
    for module in hooks:  # embeddings sharing one table (T5's encoder/decoder) cluster it once
        first = id(module.factorization) not in scheduled
        scheduled.add(id(module.factorization))
        module.cluster_schedule = schedule if first else None
        module.cluster_options = dict(cluster_options)
        module.last_clustered_step = None
    return len(scheduled) if schedule is not None else 0


class CCEClusteringCallback(KronTrainingCallback):
    """``transformers.TrainerCallback`` that clusters the model's CCE tables on ``schedule``.

    A ``KronTrainingCallback`` (it also runs every other module's ``on_train_step``, e.g. TT-Rec's
    cache), so use it instead of, not next to, ``kt.KronTrainingCallback``. The entropies and
    k-means error of each clustering are added to the Trainer's logs.
    """

    def __init__(self, schedule: ClusterSchedule | None = None, **cluster_options) -> None:
        super().__init__()
        self.schedule = schedule if schedule is not None else ClusterSchedule()
        self.cluster_options = cluster_options

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        schedule = self.schedule
        if schedule.epoch_fractions is not None and schedule.steps_per_epoch is None:
            epochs = max(math.ceil(state.num_train_epochs or args.num_train_epochs), 1)
            schedule = dataclasses.replace(schedule, steps_per_epoch=max(1, math.ceil(state.max_steps / epochs)))
        schedule_clustering(model, schedule, **self.cluster_options)
        return control


def _clustered_tables(module: nn.Module) -> list[tuple[str, CCEFactorization]]:
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, CCEFactorization)]
    if not found:
        raise ValueError(f"cluster: {type(module).__name__} holds no CCE table (CCEFactorization)")
    return [(name.rpartition(".")[0] if name.endswith("factorization") else name, m) for name, m in found]


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter]) -> None:
    """Zero the optimizer state of ``parameters`` (moments, accumulators, ``step``) in place.

    Equals a fresh start for Adam/AdamW/SGD-momentum/RMSprop/Adagrad with a zero initial
    accumulator, whose first update from a zero state is the same as from no state.
    """
    for parameter in parameters:
        state = optimizer.state.get(parameter)
        for key, value in (state or {}).items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                state[key] = type(value)(0)


@torch.no_grad()
def cluster(
    module_or_model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    backend: str = "auto",
    niter: int = 50,
    max_points_per_centroid: int = 256,
    seed: int | None = None,
    helper_init: str = "zero",
) -> dict[str, float]:
    """Re-cluster every CCE table in ``module_or_model`` (Tsang & Ahle, Algorithm 3; appendix "K-means").

    Per column block: k-means on the block of the current rows (FAISS when installed, else
    scikit-learn; ``niter=50``, ``max_points_per_centroid=256`` as the paper), pointers ``h_j``
    = cluster ids, ``M_j`` = centroids, new random ``h'_j``, ``M'_j = 0`` (``helper_init``, see
    ``CCEFactorization.cluster_table``); ``optimizer``'s state of ``M`` and ``M'`` is reset.
    ``seed`` (k-means and the new hashes) is drawn from torch's RNG when None.

    Returns, per table (keys prefixed by the module name when the table is nested deeper),
    the table-collapse entropies ``h1``, ``h2`` (appendix G, ``table_entropies``) and
    ``kmeans_error``, ``||T - T'||_F / ||T||_F`` between the rows before and after.
    """
    backend = resolve_backend(backend)
    if helper_init not in HELPER_INITS:
        raise ValueError(f"cluster: helper_init must be one of {HELPER_INITS}, got {helper_init!r}")
    metrics: dict[str, float] = {}
    for name, table in _clustered_tables(module_or_model):
        table_seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
        before = table.materialize()
        table.cluster_table(
            before,
            backend=backend,
            niter=niter,
            max_points_per_centroid=max_points_per_centroid,
            seed=table_seed,
            helper_init=helper_init,
        )
        if optimizer is not None:
            reset_optimizer_state(optimizer, [table.table, table.helper_table])
        error = float((before - table.materialize()).norm() / before.norm().clamp_min(1e-30))
        values = {**table_entropies(table.pointers), "kmeans_error": error}
        logger.info("CCE clustering of %s: %s", name or type(module_or_model).__name__, values)
        metrics.update({f"{name}.{key}" if name else key: value for key, value in values.items()})
    return metrics


def _entropy(codes: torch.Tensor) -> float:
    counts = torch.unique(codes, return_counts=True)[1].double()
    probabilities = counts / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def table_entropies(pointers: torch.Tensor | nn.Module) -> dict[str, float]:
    """Table-collapse entropies of the cluster pointers (Tsang & Ahle, appendix G), in nats.

    ``h1`` is the smallest column entropy ``H(h_j)`` (column collapse; at most ``log k``);
    ``h2`` the smallest pair entropy ``H(h_j1, h_j2)`` over column pairs (a column that is a
    permutation of another; at most ``~2 log k``), absent with one column. The paper codes a
    pair as ``h_j1 + max(h_j1) h_j2``, which is not one-to-one; ``h_j1 + (max(h_j1) + 1) h_j2``
    is used here. Accepts the ``(n, c)`` pointers or a module holding one CCE table.
    """
    if isinstance(pointers, nn.Module):
        tables = _clustered_tables(pointers)
        if len(tables) != 1:
            raise ValueError(f"table_entropies: {type(pointers).__name__} holds {len(tables)} CCE tables; pass one")
        pointers = tables[0][1].pointers
    if pointers.dim() != 2 or pointers.shape[0] == 0 or pointers.is_floating_point():
        raise ValueError(
            f"table_entropies: expected (n, c) integer pointers, got {pointers.dtype} {tuple(pointers.shape)}"
        )
    codes = pointers.long()
    result = {"h1": min(_entropy(codes[:, j]) for j in range(codes.shape[1]))}
    if codes.shape[1] > 1:
        result["h2"] = min(
            _entropy(codes[:, a] + (codes[:, a].max() + 1) * codes[:, b])
            for a in range(codes.shape[1])
            for b in range(a + 1, codes.shape[1])
        )
    return result


@dataclass
class EmbeddingCompression:
    """The "Embedding Compression" factor of Tsang & Ahle ("Measuring the Embedding Compression factor").

    ``all_tables``: dense entries of every table over the parameters of every table (small
    tables count at full size; the measure of the paper's Figure 4a). ``largest_table``: the
    same for the largest table alone (the measure of its introduction).
    """

    all_tables: float
    largest_table: float
    dense_parameters: int
    parameters: int
    tables: int


def _table_sizes(model: nn.Module) -> list[tuple[int, int, int]]:
    sizes, seen = [], set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            key, parameters = id(module.weight), module.weight.numel()
        elif (
            hasattr(module, "num_embeddings")
            and hasattr(module, "embedding_dim")
            and hasattr(module, "num_parameters")
        ):
            key, parameters = id(getattr(module, "factorization", module)), module.num_parameters()
        else:
            continue
        if key not in seen:
            seen.add(key)
            sizes.append((module.num_embeddings, module.embedding_dim, parameters))
    return sizes


def embedding_compression_factor(tables: nn.Module | Sequence[tuple[int, int, int]]) -> EmbeddingCompression:
    """Both variants of Tsang & Ahle's compression measure for a model's embedding tables.

    ``tables`` is a model (every ``nn.Embedding``/``nn.EmbeddingBag`` and compressed table,
    shared ones once) or ``(num_embeddings, embedding_dim, parameters)`` triples. The paper's
    example, vocabularies 10, 100 and 10^6 of dimension 16 with the large one a CCE table of
    500 rows' worth (8000) of parameters: ``all_tables = (10 + 100 + 10^6) / (10 + 100 + 500)``
    = 1639.5, ``largest_table = 10^6 / 500`` = 2000. Index pointers are not parameters and not
    counted (the paper's appendix D discusses their storage).
    """
    sizes = _table_sizes(tables) if isinstance(tables, nn.Module) else [tuple(map(int, t)) for t in tables]
    if not sizes:
        raise ValueError("embedding_compression_factor: no embedding tables found")
    for rows, cols, parameters in sizes:
        if rows < 1 or cols < 1 or parameters < 1:
            raise ValueError(
                f"embedding_compression_factor: invalid table (rows={rows}, dim={cols}, parameters={parameters})"
            )
    dense = sum(rows * cols for rows, cols, _ in sizes)
    stored = sum(parameters for _, _, parameters in sizes)
    rows, cols, parameters = max(sizes, key=lambda size: size[0] * size[1])
    return EmbeddingCompression(dense / stored, rows * cols / parameters, dense, stored, len(sizes))
