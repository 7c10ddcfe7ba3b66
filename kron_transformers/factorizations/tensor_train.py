"""TT-Rec: an embedding table as a tensor train of small cores, plus an LFU cache of hot rows (Yin et al.).

``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]`` (Yin et al., section 2,
eq. 2) with ``G_k`` of shape ``(R_{k-1}, m_k, n_k, R_k)``, ``R_0 = R_d = 1``, ``prod m_k >= rows``
(the vocabulary side is padded, padded rows are never read) and ``prod n_k >= cols`` (automatic
shapes factor the embedding side exactly). ``sum_k R_{k-1} m_k n_k R_k`` parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..kernels import tt_gather_rows, tt_materialize
from .base import Factorization, register_factorization
from .shapes import VOCAB_PADDING_TOLERANCE, FactorShapes, balanced_factors, validate_factor_shapes


logger = logging.getLogger(__name__)

SAMPLED_GAUSSIAN = "sampled_gaussian"
GLOROT = "glorot"
TT_INITS = (SAMPLED_GAUSSIAN, GLOROT)
DEFAULT_TT_RANK = 16
# An embedding dimension whose most balanced exact factors differ by more than this ratio (a prime,
# 2 x prime, ...) is still factored exactly, with a note that the cores are uneven.
UNEVEN_FACTOR_RATIO = 4


def tt_shapes(rows: int, cols: int, num_cores: int) -> list[tuple[int, int]]:
    """Automatic core shapes ``[(m_1, n_1), ..., (m_d, n_d)]`` for a ``rows x cols`` table.

    The vocabulary side is split into the most balanced factors with ``prod m >= rows`` (padded by
    at most ~10 %), the embedding side into the most balanced exact factors, ``prod n == cols``
    (768 = 8 x 8 x 12, 1024 = 8 x 8 x 16; a prime ``p`` gives ``1 x ... x p``, logged), unlike the
    reference's rounding, which breaks ``prod n == cols`` for 768 and 1024 (REFERENCES.md section 5).
    ``m`` ascending is paired with ``n`` descending (similar core sizes), and the largest cores are
    placed at the ends, where they cost ``R m n`` instead of ``R^2 m n``.
    """
    if not isinstance(num_cores, int) or isinstance(num_cores, bool) or num_cores < 2:
        raise ValueError(f"tt_shapes: num_cores must be an int >= 2, got {num_cores!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"tt_shapes: the table must have positive size, got {rows}x{cols}")
    row_factors = balanced_factors(rows, num_cores, True, VOCAB_PADDING_TOLERANCE)
    col_factors = balanced_factors(cols, num_cores, False)
    if max(col_factors) > UNEVEN_FACTOR_RATIO * min(col_factors):
        logger.info(
            "tt_shapes: embedding dimension %d has no balanced exact factorization into %d factors; using %s",
            cols,
            num_cores,
            " x ".join(map(str, col_factors)),
        )
    pairs = sorted(zip(row_factors, reversed(col_factors)), key=lambda pair: pair[0] * pair[1], reverse=True)
    return pairs[0::2] + pairs[1::2][::-1]


def max_tt_ranks(shapes: FactorShapes) -> list[int]:
    """Largest useful rank of each inner bond: ``min(prod_{l<=k} m_l n_l, prod_{l>k} m_l n_l)``."""
    sizes = [m * n for m, n in shapes]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def resolve_tt_ranks(tt_ranks: int | Sequence[int], shapes: FactorShapes, owner: str) -> list[int]:
    """``tt_ranks`` as one int per inner bond (an int means the same for all), clipped to ``max_tt_ranks``."""
    bonds = len(shapes) - 1
    if isinstance(tt_ranks, int) and not isinstance(tt_ranks, bool):
        ranks = [tt_ranks] * bonds
    elif isinstance(tt_ranks, Sequence) and all(isinstance(r, int) and not isinstance(r, bool) for r in tt_ranks):
        ranks = list(tt_ranks)
    else:
        raise TypeError(f"{owner}: tt_ranks must be an int or a list of {bonds} ints, got {tt_ranks!r}")
    if len(ranks) != bonds:
        raise ValueError(
            f"{owner}: {len(ranks)} TT ranks given for {len(shapes)} cores; give one int or {bonds} ints "
            f"(one per inner bond)"
        )
    if any(r < 1 for r in ranks):
        raise ValueError(f"{owner}: TT ranks must be >= 1, got {ranks}")
    clipped = [min(r, limit) for r, limit in zip(ranks, max_tt_ranks(shapes))]
    if clipped != ranks:
        logger.info("%s: TT ranks %s clipped to %s, the largest useful for shapes %s", owner, ranks, clipped, shapes)
    return clipped


def tt_num_parameters(shapes: FactorShapes, ranks: Sequence[int]) -> int:
    """``sum_k R_{k-1} m_k n_k R_k`` with ``R_0 = R_d = 1``."""
    bonds = [1, *ranks, 1]
    return sum(bonds[k] * m * n * bonds[k + 1] for k, (m, n) in enumerate(shapes))


def _tail_kurtosis(threshold: float) -> float:
    """Kurtosis ``E[w^4] / E[w^2]^2`` of ``w ~ N(0, 1)`` conditioned on ``|w| >= threshold``."""
    tail = 0.5 * math.erfc(threshold / math.sqrt(2.0))
    density = math.exp(-0.5 * threshold**2) / math.sqrt(2.0 * math.pi)
    second = 1.0 + threshold * density / tail
    fourth = 3.0 + (threshold**3 + 3.0 * threshold) * density / tail
    return fourth / second**2


def sampled_gaussian_threshold(num_cores: int) -> float:
    """Tail threshold ``t`` of the sampled Gaussian: the product of ``d`` draws has kurtosis 3.

    Yin et al., section 3.2 and Algorithm 3: each core entry is redrawn from ``N(0, 1)`` while it is
    close to zero, so the product of the cores is close to Gaussian instead of sharply peaked (the
    product of ``d`` standard normals has kurtosis ``3^d``). Kurtoses of independent factors
    multiply, so ``t`` solves ``kurtosis(|w| >= t)^d = 3`` (``t ~ 0.98`` for ``d = 3``) by bisection.
    """
    target = 3.0 ** (1.0 / num_cores)
    low, high = 0.0, 8.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _tail_kurtosis(middle) > target else (low, middle)
    return 0.5 * (low + high)


def _sample_tails(shape: torch.Size, threshold: float) -> torch.Tensor:
    """``N(0, 1)`` conditioned on ``|w| >= threshold`` (inverse CDF, so no rejection loop)."""
    lower = 0.5 * (1.0 + math.erf(threshold / math.sqrt(2.0)))
    magnitude = torch.special.ndtri(lower + (1.0 - lower) * torch.rand(shape, dtype=torch.float64))
    sign = torch.randint(0, 2, shape, dtype=torch.float64) * 2.0 - 1.0
    return magnitude * sign


def _tail_second_moment(threshold: float) -> float:
    tail = 0.5 * math.erfc(threshold / math.sqrt(2.0))
    return 1.0 + threshold * math.exp(-0.5 * threshold**2) / math.sqrt(2.0 * math.pi) / tail


class IndexParameter(nn.Parameter):
    """An integer Parameter (the cache's row ids): never requires grad, and ``requires_grad_`` leaves it alone.

    A Parameter rather than a buffer because a tied output head shares the factorization, and
    transformers declares (and saves once) shared Parameters only; ``model.requires_grad_(True)``
    must then skip it, as autograd refuses integer tensors.
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> IndexParameter:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> IndexParameter:
        return self


@register_factorization
class TensorTrainFactorization(Factorization):
    """TT-matrix table (Yin et al., eq. 2), cores ``cores[k]: (R_{k-1}, m_k, n_k, R_k)``, with an optional LFU cache.

    The cache (Yin et al., section 4.2) holds ``cache_size`` uncompressed, trainable rows
    (``cache_weight``, a Parameter) for the ids in the sorted integer ``cache_ids`` (``-1`` = empty
    slot). Those rows replace the TT rows in ``gather_rows`` and ``materialize`` (gradients reach
    the cache rows only); the rest come from the cores. ``record_lookups`` counts ids while training;
    ``on_train_step`` fills the cache with the most frequent ids after ``cache_warmup_steps`` steps
    and refills it every ``cache_refresh_every`` steps (0: never), writing evicted rows back into
    the cores (``write_back``). Both cache tensors are in the state dict, so a checkpoint restores it.
    """

    kind = "tensor_train"

    def __init__(
        self,
        rows: int,
        cols: int,
        tt_shapes: Sequence[Sequence[int]],
        tt_ranks: int | Sequence[int],
        init: str = SAMPLED_GAUSSIAN,
        cache_size: int = 0,
        cache_warmup_steps: int = 100,
        cache_refresh_every: int = 1000,
        cache_write_back_steps: int = 20,
    ) -> None:
        super().__init__(rows, cols)
        self.tt_shapes = validate_factor_shapes(tt_shapes, rows, cols, "TensorTrain")
        self.tt_ranks = resolve_tt_ranks(tt_ranks, self.tt_shapes, "TensorTrain")
        if init not in TT_INITS:
            raise ValueError(f"TensorTrain: init must be one of {TT_INITS}, got {init!r}")
        self.init = init
        for name, value, minimum in (
            ("cache_size", cache_size, 0),
            ("cache_warmup_steps", cache_warmup_steps, 0),
            ("cache_refresh_every", cache_refresh_every, 0),
            ("cache_write_back_steps", cache_write_back_steps, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"TensorTrain: {name} must be an int >= {minimum}, got {value!r}")
        if cache_size > rows:
            raise ValueError(f"TensorTrain: cache_size {cache_size} exceeds the {rows} rows of the table")
        self.cache_size = cache_size
        self.cache_warmup_steps = cache_warmup_steps
        self.cache_refresh_every = cache_refresh_every
        self.cache_write_back_steps = cache_write_back_steps
        bonds = [1, *self.tt_ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bonds[k], m, n, bonds[k + 1])) for k, (m, n) in enumerate(self.tt_shapes)
        )
        if cache_size:
            self.cache_weight = nn.Parameter(torch.zeros(cache_size, cols))
            self.cache_ids = IndexParameter(torch.full((cache_size,), -1, dtype=torch.long))
        # Lookup counts of the current window (not saved: a resumed run re-counts) and (hits, lookups).
        self._frequency: torch.Tensor | None = None
        self._hit_counts: torch.Tensor | None = None
        self._last_population: int | None = None
        self.reset_random(self.default_std())

    def num_parameters(self) -> int:
        """Trainable numbers stored: the cores and the cache rows (not the integer ``cache_ids``)."""
        return sum(p.numel() for p in self.parameters() if p.is_floating_point())

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Keep ``cache_ids`` an ``IndexParameter`` when a loader assigns a plain Parameter (transformers does)."""
        if name == "cache_ids" and param is not None and not isinstance(param, IndexParameter):
            param = IndexParameter(param.data)
        super().register_parameter(name, param)

    @property
    def num_cores(self) -> int:
        return len(self.tt_shapes)

    def default_std(self) -> float:
        """Entry std of a fresh table: ``sqrt(1 / 3n)`` (sampled Gaussian, Yin et al., Table 1) or Glorot's."""
        if self.init == SAMPLED_GAUSSIAN:
            return math.sqrt(1.0 / (3.0 * self.rows))
        return math.sqrt(2.0 / (self.rows + self.cols))

    # --- the table -------------------------------------------------------------------------------

    def materialize(self) -> torch.Tensor:
        table = tt_materialize(list(self.cores), self.rows, self.cols)
        if not self.cache_size:
            return table
        # Empty slots (id -1) write into one extra row that is cropped off: no data-dependent shapes (meta-safe).
        targets = torch.where(self.cache_ids >= 0, self.cache_ids, self.rows)
        extended = torch.cat([table, table.new_zeros(1, self.cols)])
        return extended.index_copy(0, targets, self.cache_weight.to(table.dtype))[: self.rows]

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]``: cached ids read ``cache_weight``, the others the TT chain (``tt_gather_rows``)."""
        if not self.cache_size:
            return tt_gather_rows(ids, list(self.cores), self.cols)
        unique_ids, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        slots, hit = self._cache_slots(unique_ids)
        miss_positions, hit_positions = (~hit).nonzero().squeeze(1), hit.nonzero().squeeze(1)
        computed = tt_gather_rows(unique_ids[miss_positions], list(self.cores), self.cols)
        cached = self.cache_weight[slots[hit_positions]].to(computed.dtype)
        rows = computed.new_zeros(len(unique_ids), self.cols)
        rows = rows.index_copy(0, miss_positions, computed).index_copy(0, hit_positions, cached)
        return rows[inverse].reshape(*ids.shape, self.cols)

    def structure(self) -> dict[str, Any]:
        structure = {
            "factorization": self.kind,
            "tt_shapes": [list(shape) for shape in self.tt_shapes],
            "tt_ranks": list(self.tt_ranks),
            "init": self.init,
        }
        if self.cache_size:
            structure.update(
                cache_size=self.cache_size,
                cache_warmup_steps=self.cache_warmup_steps,
                cache_refresh_every=self.cache_refresh_every,
                cache_write_back_steps=self.cache_write_back_steps,
            )
        return structure

    # --- initialization --------------------------------------------------------------------------

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """Random cores whose product has entries of mean 0 and standard deviation ``std``.

        An entry is a sum of ``prod_k R_k`` uncorrelated products of ``d`` core entries, so core
        entries of variance ``s^2 v`` give ``Var(W) = prod_k R_k (s^2 v)^d``. ``sampled_gaussian``
        draws core entries from the tails ``|w| >= t`` of ``N(0, 1)`` (``v = E[w^2 | |w| >= t]``,
        Yin et al., Algorithm 3, ``t`` from ``sampled_gaussian_threshold``); ``glorot`` from ``N(0, 1)``
        (``v = 1``; with the default ``std = sqrt(2 / (rows + cols))`` this is T3nsor's Glorot init).
        """
        threshold = sampled_gaussian_threshold(self.num_cores) if self.init == SAMPLED_GAUSSIAN else 0.0
        variance = _tail_second_moment(threshold) if self.init == SAMPLED_GAUSSIAN else 1.0
        scale = (std**2 / (math.prod(self.tt_ranks) * variance**self.num_cores)) ** (1.0 / (2 * self.num_cores))
        for core in self.cores:
            draws = _sample_tails(core.shape, threshold) if self.init == SAMPLED_GAUSSIAN else torch.randn(core.shape)
            core.copy_(draws * scale)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """TT-SVD (Oseledets 2011) of the zero-padded table, truncated to ``tt_ranks``.

        The table is reshaped to the order-``d`` tensor with modes ``(m_k n_k)`` (row and column
        digit of each core together); successive truncated SVDs of its unfoldings give the cores
        left to right. Exact when the ranks reach ``max_tt_ranks``; quasi-optimal otherwise.
        A bond whose unfolding has fewer singular values than its rank gets zero slices.
        """
        shapes = self.tt_shapes
        order = self.num_cores
        grid = (math.prod(m for m, _ in shapes), math.prod(n for _, n in shapes))
        padded = weight.new_zeros(grid, dtype=torch.float64)
        padded[: self.rows, : self.cols] = weight.to(torch.float64)
        tensor = padded.reshape(*(m for m, _ in shapes), *(n for _, n in shapes))
        tensor = tensor.permute(*(index for k in range(order) for index in (k, order + k)))
        remainder = tensor.reshape(-1)
        rank_in = 1
        for k, (core, (m, n)) in enumerate(zip(self.cores, shapes)):
            if k == order - 1:
                solution = remainder.reshape(rank_in, m, n, 1)
            else:
                left, singular, right = torch.linalg.svd(remainder.reshape(rank_in * m * n, -1), full_matrices=False)
                kept = min(self.tt_ranks[k], len(singular))
                solution = left[:, :kept].reshape(rank_in, m, n, kept)
                remainder = singular[:kept, None] * right[:kept]
                rank_in = kept
            core.zero_()
            core[: solution.shape[0], :, :, : solution.shape[3]] = solution.to(core.dtype)
        return self.relative_error(weight)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, tt_ranks: int | Sequence[int] = DEFAULT_TT_RANK, num_cores: int = 3, **kwargs: Any
    ) -> TensorTrainFactorization:
        """TT-SVD of a pretrained ``(rows, cols)`` table (automatic shapes unless ``tt_shapes=`` is given)."""
        rows, cols = weight.shape
        shapes = kwargs.pop("tt_shapes", None) or tt_shapes(rows, cols, num_cores)
        factorization = cls(rows, cols, shapes, tt_ranks, **kwargs).to(weight.device, weight.dtype)
        factorization.fit(weight)
        return factorization

    # --- LFU cache (Yin et al., section 4.2) -------------------------------------------------------

    def _cache_slots(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot of each id in the sorted ``cache_ids`` and whether it is cached."""
        ids = ids.long()
        cache_ids = self.cache_ids.detach()
        slots = torch.searchsorted(cache_ids, ids).clamp_max(self.cache_size - 1)
        return slots, cache_ids[slots] == ids

    @torch.no_grad()
    def record_lookups(self, ids: torch.Tensor, ignore_id: int | None = None) -> None:
        """Count a training batch's ids (every occurrence) for the LFU ranking and the hit rate."""
        if not self.cache_size:
            return
        flat = ids.reshape(-1).long()
        if ignore_id is not None:
            flat = flat[flat != ignore_id]
        if self._frequency is None or self._frequency.device != flat.device:
            self._frequency = torch.zeros(self.rows, dtype=torch.long, device=flat.device)
            self._hit_counts = torch.zeros(2, dtype=torch.long, device=flat.device)
        self._frequency.index_add_(0, flat, torch.ones_like(flat))
        hits = self._cache_slots(flat)[1].sum()
        self._hit_counts += torch.stack([hits, hits.new_tensor(flat.numel())])

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of the training lookups since the last cache population that were served by the cache."""
        if self._hit_counts is None or int(self._hit_counts[1]) == 0:
            return 0.0
        return float(self._hit_counts[0]) / float(self._hit_counts[1])

    def on_train_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float] | None:
        """Training hook (``kron_transformers.training``): populate the cache when due; report the hit rate."""
        if not self.cache_size:
            return None
        if self._last_population is None and bool((self.cache_ids >= 0).any()):
            self._last_population = step  # a cache restored from a checkpoint
        metrics = {"cache_hit_rate": self.cache_hit_rate}
        first = self._last_population is None and step >= self.cache_warmup_steps
        refresh = (
            self._last_population is not None
            and self.cache_refresh_every > 0
            and step - self._last_population >= self.cache_refresh_every
        )
        if (first or refresh) and self.populate_cache(optimizer):
            self._last_population = step
        return metrics

    @torch.no_grad()
    def populate_cache(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Fill the cache with the most frequently looked-up ids of the counting window, then reset the counts.

        Rows that stay keep their trained values (and optimizer state); new rows start from the
        cores, so the table is unchanged by adding them; evicted rows are written back into the
        cores (``write_back``) instead of discarded. In ``optimizer``, the per-row state of
        ``cache_weight`` (Adam's moments, ...) moves with its rows and is zero for new rows.
        Returns False (nothing done) when no lookups were counted yet.
        """
        seen = 0 if self._frequency is None else int((self._frequency > 0).sum())
        if not seen:
            return False
        count = min(self.cache_size, seen)
        chosen = torch.topk(self._frequency, count).indices.sort().values
        old_ids = self.cache_ids.clone()
        old_filled = (old_ids >= 0).nonzero().squeeze(1)
        evicted = old_filled[~torch.isin(old_ids[old_filled], chosen)]
        if len(evicted) and self.cache_write_back_steps:
            before, after = self.write_back(
                old_ids[evicted], self.cache_weight[evicted].detach(), self._anchor_ids(chosen, old_ids)
            )
            logger.info("TensorTrain cache: evicted rows written back, relative error %.4f -> %.4f", before, after)
        new_ids = torch.cat([chosen.new_full((self.cache_size - count,), -1), chosen])
        new_slots = torch.arange(self.cache_size - count, self.cache_size, device=new_ids.device)
        old_slots, kept = self._cache_slots(chosen)
        kept_new, kept_old = new_slots[kept], old_slots[kept]
        rows = self.cache_weight.new_zeros(self.cache_size, self.cols)
        rows[kept_new] = self.cache_weight[kept_old]
        fresh = new_slots[~kept]
        rows[fresh] = tt_gather_rows(new_ids[fresh], list(self.cores), self.cols).to(rows.dtype)
        self.cache_weight.copy_(rows)
        self.cache_ids.copy_(new_ids)
        if optimizer is not None:
            for key, value in optimizer.state.get(self.cache_weight, {}).items():
                if torch.is_tensor(value) and value.shape == self.cache_weight.shape:
                    moved = torch.zeros_like(value)
                    moved[kept_new] = value[kept_old]
                    value.copy_(moved)
        logger.info(
            "TensorTrain cache: %d rows cached (%d new, %d evicted), hit rate of the last window %.3f",
            count,
            len(fresh),
            len(evicted),
            self.cache_hit_rate,
        )
        self._frequency.zero_()
        self._hit_counts.zero_()
        return True

    def _anchor_ids(self, chosen: torch.Tensor, old_ids: torch.Tensor) -> torch.Tensor:
        """The most frequent rows served by the cores: the write-back keeps them unchanged."""
        frequency = self._frequency.clone()
        frequency[chosen] = 0
        frequency[old_ids[old_ids >= 0]] = 0
        count = min(max(4 * self.cache_size, 256), int((frequency > 0).sum()))
        return torch.topk(frequency, count).indices

    def write_back(self, ids: torch.Tensor, rows: torch.Tensor, anchor_ids: torch.Tensor) -> tuple[float, float]:
        """Fit the cores so ``W[ids] ~ rows`` while ``W[anchor_ids]`` stays; returns the relative error before/after.

        The reference discards trained cache rows on eviction (Yin et al., section 4.2). Here
        ``cache_write_back_steps`` iterations of L-BFGS (strong Wolfe line search) minimize
        ``||W[ids] - rows||^2 / ||rows||^2 + ||W[anchors] - W_old[anchors]||^2 / ||W_old[anchors]||^2``
        over all cores (in at least float32): the second term keeps the rows the cores still serve from drifting.
        The optimizer's state for the cores is kept as is.
        """
        before = self._row_error(ids, rows)
        with torch.enable_grad():
            dtype = torch.promote_types(self.cores[0].dtype, torch.float32)  # L-BFGS in at least float32
            variables = [core.detach().to(dtype, copy=True).requires_grad_(True) for core in self.cores]
            target = rows.detach().to(variables[0].dtype)
            anchors = tt_gather_rows(anchor_ids, variables, self.cols).detach()
            target_norm = target.pow(2).sum().clamp_min(1e-30)
            anchor_norm = anchors.pow(2).sum().clamp_min(1e-30)
            solver = torch.optim.LBFGS(
                variables, lr=1.0, max_iter=self.cache_write_back_steps, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                solver.zero_grad()
                fitted = (tt_gather_rows(ids, variables, self.cols) - target).pow(2).sum() / target_norm
                kept = (tt_gather_rows(anchor_ids, variables, self.cols) - anchors).pow(2).sum() / anchor_norm
                loss = fitted + kept
                loss.backward()
                return loss

            solver.step(closure)
        with torch.no_grad():
            for core, variable in zip(self.cores, variables):
                core.copy_(variable)
        after = self._row_error(ids, rows)
        return before, after

    @torch.no_grad()
    def _row_error(self, ids: torch.Tensor, rows: torch.Tensor) -> float:
        """``||W[ids] - rows||_F / ||rows||_F`` of the rows the cores give."""
        difference = tt_gather_rows(ids, list(self.cores), self.cols) - rows.to(self.cores[0].dtype)
        return float(difference.norm() / rows.norm().clamp_min(1e-30))
