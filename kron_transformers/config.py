"""Method specs and ``KronConfig``: the serializable description of a compression (ARCHITECTURE.md layer 4).

A spec says *which* factorization a weight gets and how large it may be (``rank=`` or a
target ``compression=`` ratio). ``spec.resolve(rows, cols, target)`` turns it into the exact
structure (factor shapes, rank) for one matrix; the structure is what gets recorded on the
model, so a checkpoint never depends on these heuristics again.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from .factorizations.cce import default_table_rows
from .factorizations.shapes import (
    VOCAB_PADDING_TOLERANCE,
    FactorShapes,
    balanced_factor_shapes,
    balanced_factors,
    max_kronecker_rank,
    validate_factor_shapes,
)
from .factorizations.tensor_train import (
    DEFAULT_TT_RANK,
    SAMPLED_GAUSSIAN,
    TT_INITS,
    max_tt_ranks,
    resolve_tt_ranks,
    tt_num_parameters,
    tt_shapes,
)
from .factorizations.weighted import CALIBRATED_TIME_RATIO


logger = logging.getLogger(__name__)

LINEAR = "linear"
EMBEDDING = "embedding"

SPECS: dict[str, type[MethodSpec]] = {}

# The papers each spec implements (``MethodSpec.paper``, shown in model cards)
PANAHI = "A. Panahi, *Improving Space Efficiency of Deep Neural Networks* (PhD thesis, 2021)"
ZHU_ET_AL = "D. Zhu, Z. Zuo, M. M. Khalili, *An Efficient Training Algorithm for Models with Block-wise Sparsity*"
TSANG_AHLE = "H. L. Tsang, T. D. Ahle, *Clustering the Sketch: Dynamic Compression for Embedding Tables* (CCE)"
YIN_ET_AL = (
    "C. Yin, B. Acun, X. Liu, C.-J. Wu, *TT-Rec: Tensor Train Compression for Deep Learning Recommendation Model "
    "Embeddings*"
)


def register_spec(cls: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator: make a spec loadable by name from ``KronConfig.from_dict``."""
    SPECS[cls.__name__] = cls
    return cls


def _describe(rows: int, cols: int) -> str:
    return f"{rows}x{cols}"


@dataclass
class MethodSpec:
    """Base of the method specs: the rank, or a target compression ratio for each matrix."""

    targets: ClassVar[frozenset[str]] = frozenset({LINEAR, EMBEDDING})
    paper: ClassVar[str] = ""

    rank: int | None = field(default=None, metadata={"help": "Number of terms (rank) of the factorization."})
    compression: float | None = field(
        default=None,
        metadata={"help": "Target ratio dense/compressed parameters per matrix; the rank is chosen to meet it."},
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        if (self.rank is None) == (self.compression is None):
            raise ValueError(
                f"{name}: give exactly one of rank= or compression= (got rank={self.rank}, "
                f"compression={self.compression})"
            )
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"{name}: rank must be a positive int, got {self.rank!r}")
        if self.compression is not None and not (isinstance(self.compression, (int, float)) and self.compression > 1):
            raise ValueError(f"{name}: compression must be a number > 1 (dense/compressed), got {self.compression!r}")

    @property
    def method(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> MethodSpec:
        arguments = dict(data)
        name = arguments.pop("method", None)
        if name not in SPECS:
            raise ValueError(f"unknown method {name!r} in {data}; known methods: {sorted(SPECS)}")
        return SPECS[name](**arguments)

    def check_target(self, target: str, module_name: str, rows: int, cols: int) -> None:
        if target not in self.targets:
            accepted = " and ".join(sorted(self.targets))
            raise ValueError(
                f"{module_name} ({target}, weight {_describe(rows, cols)}): {self.method} applies to {accepted} "
                f"layers only; choose another method for this module or exclude it"
            )

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        """The exact structure (a ``Factorization.structure()`` dict) for one ``rows x cols`` weight."""
        raise NotImplementedError

    def _rank_for_budget(self, parameters_for_rank, max_rank: int, rows: int, cols: int, module_name: str) -> int:
        """Largest rank whose parameter count meets ``compression``; logged so the user sees it."""
        if self.rank is not None:
            return self.rank
        budget = rows * cols / self.compression
        rank = 1
        while rank < max_rank and parameters_for_rank(rank + 1) <= budget:
            rank += 1
        achieved = rows * cols / parameters_for_rank(rank)
        if achieved < self.compression:
            logger.warning(
                "%s: %s cannot reach compression %.1fx on a %s weight; using rank 1 (%.1fx)",
                module_name,
                self.method,
                self.compression,
                _describe(rows, cols),
                achieved,
            )
        else:
            logger.info("%s: %s picked rank %d (%.1fx)", module_name, self.method, rank, achieved)
        return rank

    def _check_rank(self, rank: int, max_rank: int, rows: int, cols: int, detail: str, module_name: str) -> None:
        if rank > max_rank:
            raise ValueError(
                f"{module_name}: rank {rank} exceeds the maximum {max_rank} for a {_describe(rows, cols)} "
                f"matrix with {detail}; use rank <= {max_rank}"
            )


@dataclass
class _KroneckerSumSpec(MethodSpec):
    """Shared resolution of the sum-of-Kronecker-products methods (Panahi, eq. 3.4)."""

    def factor_shapes_for(self, rows: int, cols: int, target: str, module_name: str) -> FactorShapes:
        raise NotImplementedError

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        shapes = self.factor_shapes_for(rows, cols, target, module_name)
        max_rank = max_kronecker_rank(shapes)
        per_rank = sum(a * b for a, b in shapes)
        rank = self._rank_for_budget(lambda r: r * per_rank, max_rank, rows, cols, module_name)
        self._check_rank(rank, max_rank, rows, cols, f"factor shapes {shapes}", module_name)
        return {"factorization": "kronecker_sum", "factor_shapes": [list(s) for s in shapes], "rank": rank}

    @staticmethod
    def _balanced(rows: int, cols: int, order: int, target: str) -> FactorShapes:
        if target == EMBEDDING:  # pad the vocabulary side only; the embedding dimension factors exactly
            return balanced_factor_shapes(rows, cols, order, True, False, VOCAB_PADDING_TOLERANCE)
        return balanced_factor_shapes(rows, cols, order)


@register_spec
@dataclass
class Shapeshifter(_KroneckerSumSpec):
    """Shapeshifter (Panahi, section 4.3): ``W = sum_{k<=r} A_k ⊗ B_k`` with balanced ``A_k, B_k``.

    Equivalent to a rank-r factorization of the ``sqrt(mn) x sqrt(mn)`` rearrangement of ``W``;
    ``2 r sqrt(mn)`` parameters instead of ``mn``.

    ```py
    kt.Shapeshifter(rank=16)          # attention / FFN linears
    kt.Shapeshifter(compression=50)   # rank chosen per matrix
    ```
    """

    paper: ClassVar[str] = f"{PANAHI}, section 4.3"

    def factor_shapes_for(self, rows: int, cols: int, target: str, module_name: str) -> FactorShapes:
        return self._balanced(rows, cols, 2, target)


@register_spec
@dataclass
class Kronecker(_KroneckerSumSpec):
    """Sum of Kronecker products of any order with user-given or balanced factor shapes (Panahi, eq. 3.4).

    ``factor_shapes=[(a_1, b_1), ..., (a_n, b_n)]`` with ``prod a_j >= rows`` and
    ``prod b_j >= cols`` (the weight is padded, then cropped), in the weight's ``(rows, cols)``
    orientation: ``(out, in)`` for linears, ``(vocab, dim)`` for embeddings.
    """

    paper: ClassVar[str] = f"{PANAHI}, eq. 3.4"

    order: int = field(default=2, metadata={"help": "Number of Kronecker factors per term."})
    factor_shapes: list[list[int]] | None = field(
        default=None, metadata={"help": "Explicit (rows, cols) of each factor; balanced shapes when None."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.order, int) or self.order < 2:
            raise ValueError(f"{self.method}: order must be an int >= 2, got {self.order!r}")
        if self.factor_shapes is not None:
            self.factor_shapes = [list(shape) for shape in self.factor_shapes]
            if len(self.factor_shapes) != self.order:
                raise ValueError(
                    f"{self.method}: {len(self.factor_shapes)} factor shapes given for order {self.order}; "
                    f"give one (rows, cols) pair per factor"
                )

    def factor_shapes_for(self, rows: int, cols: int, target: str, module_name: str) -> FactorShapes:
        if self.factor_shapes is not None:
            return validate_factor_shapes(self.factor_shapes, rows, cols, module_name)
        return self._balanced(rows, cols, self.order, target)


@register_spec
@dataclass
class Word2KetXS(Kronecker):
    """word2ketXS (Panahi, section 3.4.2, eq. 3.4): the whole ``d x p`` embedding matrix as
    ``sum_k ⊗_j F_jk``, rows gathered lazily. Embeddings (and their tied output head) only.
    """

    targets: ClassVar[frozenset[str]] = frozenset({EMBEDDING})
    paper: ClassVar[str] = f"{PANAHI}, section 3.4.2"


@register_spec
@dataclass
class Word2Ket(MethodSpec):
    """word2ket (Panahi, section 3.3.3, eq. 3.3): each token's vector ``sum_k ⊗_j v_jk``.

    Embeddings only. ``leaf_dims`` (``q_j``, product >= embedding dim) default to the most
    balanced exact factorization of the dimension; ``layer_norm`` adds the paper's LayerNorm
    at the tree's internal nodes.
    """

    targets: ClassVar[frozenset[str]] = frozenset({EMBEDDING})
    paper: ClassVar[str] = f"{PANAHI}, section 3.3.3"

    order: int = field(default=2, metadata={"help": "Number of leaf vectors per rank term."})
    leaf_dims: list[int] | None = field(default=None, metadata={"help": "Size q_j of each leaf vector."})
    layer_norm: bool = field(default=False, metadata={"help": "LayerNorm at internal tree nodes (Panahi, 3.3.3)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.order, int) or self.order < 2:
            raise ValueError(f"Word2Ket: order must be an int >= 2, got {self.order!r}")
        if self.leaf_dims is not None:
            self.leaf_dims = [int(q) for q in self.leaf_dims]
            if len(self.leaf_dims) != self.order:
                raise ValueError(f"Word2Ket: {len(self.leaf_dims)} leaf dims given for order {self.order}")

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        if self.leaf_dims is not None:
            dims = tuple(self.leaf_dims)
            if math.prod(dims) < cols:
                raise ValueError(
                    f"{module_name}: leaf dims {dims} cover {math.prod(dims)} columns, fewer than the "
                    f"embedding dimension {cols}; their product must be >= {cols}"
                )
        else:
            dims = balanced_factors(cols, self.order)
        max_rank = math.prod(dims) // max(dims)
        rank = self._rank_for_budget(lambda r: r * rows * sum(dims), max_rank, rows, cols, module_name)
        self._check_rank(rank, max_rank, rows, cols, f"leaf dims {dims}", module_name)
        return {"factorization": "word2ket", "leaf_dims": list(dims), "rank": rank, "layer_norm": self.layer_norm}


@register_spec
@dataclass
class PHM(MethodSpec):
    """Parameterized hypercomplex multiplication: ``W = sum_{i=1..n} C_i ⊗ W_i``, ``C_i`` of shape ``n x n``.

    The baseline Panahi compares against (section 4.4.1; ``n^3 + mn/n`` parameters). Linears
    only; both dimensions must be divisible by ``n``. The rank is ``n``.
    """

    targets: ClassVar[frozenset[str]] = frozenset({LINEAR})
    paper: ClassVar[str] = f"{PANAHI}, section 4.4.1 (baseline)"

    rank: int | None = field(default=None, metadata={"help": "Fixed to n; leave unset."})
    n: int = field(default=4, metadata={"help": "Hypercomplex dimension: n terms, n x n rule matrices."})

    def __post_init__(self) -> None:
        if self.rank is not None or self.compression is not None:
            raise ValueError("PHM: the rank is n and the size follows from n; set n= only")
        if not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"PHM: n must be an int >= 2, got {self.n!r}")

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        if rows % self.n or cols % self.n:
            raise ValueError(
                f"{module_name}: PHM n={self.n} needs both dimensions of the {_describe(rows, cols)} weight to be "
                f"divisible by n; choose n dividing {math.gcd(rows, cols)}"
            )
        shapes = [[self.n, self.n], [rows // self.n, cols // self.n]]
        return {"factorization": "kronecker_sum", "factor_shapes": shapes, "rank": self.n}


def _tiles(size, rows: int, cols: int) -> bool:
    return rows % size[0] == 0 and cols % size[1] == 0


def optimal_kpd_block(rows: int, cols: int, rank: int) -> tuple[int, int]:
    """Block size minimizing KPD's parameters (Zhu et al., eq. 5, generalized to rank r).

    ``min (1 + r) m1 n1 + r m2 n2`` over ``m1 m2 = rows``, ``n1 n2 = cols`` (``S`` plus ``r``
    pairs ``A_i, B_i``); for ``r = 1`` this is eq. 5, ``2 m1 n1 + m2 n2``. Solved exactly by
    enumerating divisors. Returns the block ``(m2, n2)``.
    """
    row_divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    col_divisors = [d for d in range(1, cols + 1) if cols % d == 0]
    best = min(
        ((1 + rank) * (rows // m2) * (cols // n2) + rank * m2 * n2, -m2 * n2, m2, n2)
        for m2 in row_divisors
        for n2 in col_divisors
    )
    return best[2], best[3]


@register_spec
@dataclass
class KPD(MethodSpec):
    """KPD block-sparse Kronecker layer (Zhu et al., eq. 3): ``W = sum_i (S ⊙ A_i) ⊗ B_i``.

    ``block_size`` is ``B_i``'s shape in the weight's ``(out, in)`` orientation and must tile
    the weight; when None the parameter-optimal block of eq. 5 is used. Linears only.
    """

    targets: ClassVar[frozenset[str]] = frozenset({LINEAR})
    paper: ClassVar[str] = f"{ZHU_ET_AL}, eq. 3"

    block_size: list[int] | None = field(
        default=None, metadata={"help": "(rows, cols) of each block B_i; eq. 5 optimum when None."}
    )
    block_sizes: list[list[int]] | None = field(
        default=None,
        metadata={"help": "Candidate block sizes for pattern selection (Zhu et al., section 5, eq. 7)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for size in ([self.block_size] if self.block_size is not None else []) + list(self.block_sizes or []):
            if len(size) != 2 or any(not isinstance(v, int) or v < 1 for v in size):
                raise ValueError(f"KPD: a block size must be two positive ints, got {size!r}")
        if self.block_size is not None:
            self.block_size = list(self.block_size)
        if self.block_sizes is not None:
            self.block_sizes = [list(size) for size in self.block_sizes]
            if self.block_size is not None or self.rank is None or len(self.block_sizes) < 2:
                raise ValueError(
                    "KPD pattern selection: give block_sizes= (at least two) with rank=, and no block_size="
                )

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        if self.block_sizes is not None:
            for size in self.block_sizes:
                self._check_tiles(size, rows, cols, module_name)
            return {"factorization": "kpd_patterns", "block_sizes": self.block_sizes, "rank": self.rank}

        def block_for(rank: int) -> tuple[int, int]:
            return tuple(self.block_size) if self.block_size is not None else optimal_kpd_block(rows, cols, rank)

        def parameters(rank: int) -> int:
            m2, n2 = block_for(rank)
            grid = (rows // m2) * (cols // n2)
            return grid + rank * (grid + m2 * n2)

        m2, n2 = block_for(self.rank or 1)
        self._check_tiles((m2, n2), rows, cols, module_name)
        max_rank = min((rows // m2) * (cols // n2), m2 * n2)
        rank = self._rank_for_budget(parameters, max_rank, rows, cols, module_name)
        m2, n2 = block_for(rank)
        self._check_rank(
            rank, min((rows // m2) * (cols // n2), m2 * n2), rows, cols, f"block size {(m2, n2)}", module_name
        )
        return {"factorization": "kpd", "block_size": [m2, n2], "rank": rank}

    @staticmethod
    def _check_tiles(size, rows: int, cols: int, module_name: str) -> None:
        if not _tiles(size, rows, cols):
            raise ValueError(
                f"{module_name}: KPD block size {tuple(size)} does not tile the {_describe(rows, cols)} weight "
                f"(out x in); use a block whose rows divide {rows} and whose columns divide {cols}"
            )


@register_spec
@dataclass
class LowRank(MethodSpec):
    """The standard ``(n x r)(r x m)`` factorization, the baseline of Panahi, section 4.4.3."""

    paper: ClassVar[str] = f"{PANAHI}, section 4.4.3 (baseline)"

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        max_rank = min(rows, cols)
        rank = self._rank_for_budget(lambda r: r * (rows + cols), max_rank, rows, cols, module_name)
        self._check_rank(rank, max_rank, rows, cols, "a plain low-rank factorization", module_name)
        return {"factorization": "low_rank", "rank": rank}


@register_spec
@dataclass
class CCE(MethodSpec):
    """Clustered Compositional Embeddings (Tsang & Ahle, Algorithm 3): ``c`` column blocks, each
    ``M_j[h_j(id)] + M'_j[h'_j(id)]`` with two ``table_rows``-row tables; ``2 * table_rows * dim``
    parameters. Embeddings (and their tied output head) only. Give ``table_rows`` or a target
    ``compression``; with neither, ``table_rows = ceil(sqrt(vocab))``. Re-cluster during training
    with ``kt.cce.CCEClusteringCallback`` / ``kt.cce.cluster``.

    ```py
    kt.CCE()                                   # 4 columns, sqrt(vocab) rows
    kt.CCE(num_columns=4, compression=100)
    ```
    """

    targets: ClassVar[frozenset[str]] = frozenset({EMBEDDING})
    paper: ClassVar[str] = f"{TSANG_AHLE}, Algorithm 3"

    rank: int | None = field(default=None, metadata={"help": "Not used by CCE; leave unset."})
    num_columns: int = field(default=4, metadata={"help": "Column blocks c (hash functions); the paper uses 4."})
    table_rows: int | None = field(default=None, metadata={"help": "Rows of each table M_j, M'_j."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial universal-hash pointers."})

    def __post_init__(self) -> None:
        if self.rank is not None:
            raise ValueError("CCE: there is no rank; set table_rows= or compression=")
        if self.table_rows is not None and self.compression is not None:
            raise ValueError("CCE: give table_rows= or compression=, not both")
        if self.compression is not None and not (isinstance(self.compression, (int, float)) and self.compression > 1):
            raise ValueError(f"CCE: compression must be a number > 1 (dense/compressed), got {self.compression!r}")
        for name in ("num_columns", "table_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"CCE: {name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"CCE: seed must be an int, got {self.seed!r}")

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        if self.num_columns > cols:
            raise ValueError(
                f"{module_name}: CCE num_columns={self.num_columns} exceeds the embedding dimension {cols}; "
                f"use num_columns <= {cols}"
            )
        if self.table_rows is not None:
            table_rows = self.table_rows
        elif self.compression is not None:
            table_rows = max(1, int(rows / (2 * self.compression)))
        else:
            table_rows = default_table_rows(rows)
        if table_rows > rows:
            raise ValueError(
                f"{module_name}: CCE table_rows={table_rows} exceeds the {rows} rows of the {_describe(rows, cols)} "
                f"table; use table_rows <= {rows}"
            )
        achieved = rows / (2 * table_rows)
        if self.compression is not None and achieved < self.compression:
            logger.warning(
                "%s: CCE cannot reach compression %.1fx on a %s table; using 1 row (%.1fx)",
                module_name,
                self.compression,
                _describe(rows, cols),
                achieved,
            )
        else:
            logger.info("%s: CCE picked table_rows=%d (%.1fx)", module_name, table_rows, achieved)
        return {"factorization": "cce", "num_columns": self.num_columns, "table_rows": table_rows, "seed": self.seed}


INITS = ("svd", "random", "calibrated")
QUANT_METHOD = "kron"
CONFIG_VERSION = 1
ROLES = ("embedding", "attention", "ffn", "lm_head")


def _spec_or_none(value: Any, name: str) -> MethodSpec | None:
    if value is None or isinstance(value, MethodSpec):
        return value
    if isinstance(value, dict):
        return MethodSpec.from_dict(value)
    raise TypeError(f"KronConfig.{name}: expected a method spec such as kt.Shapeshifter(rank=8), got {value!r}")


@dataclass
class KronConfig(QuantizationConfigMixin):
    """What to compress and how, torchao-style: a serializable config separate from the transform.

    Each module gets, in order: nothing if it matches ``exclude_modules``; the spec of the first
    ``rules`` pattern it matches (a ``None`` value keeps it dense); else, if ``target_modules`` is
    set and does not match it, nothing; else the spec of its role (``embedding``, ``attention``,
    ``ffn``, ``lm_head``), or ``default`` for any other targeted linear.

    Patterns follow PEFT: a string is a regex matched against the full module name
    (``re.fullmatch``), a list holds exact names or name suffixes, and ``"all-linear"`` means every
    linear layer except the output head.

    It is also the transformers quantization config of method ``"kron"``: once a model is
    compressed, ``model.config.quantization_config`` is a copy whose ``modules`` holds the resolved
    structure of every replaced module, which is what ``from_pretrained`` rebuilds.

    ```py
    cfg = kt.KronConfig(embedding=kt.Word2KetXS(order=2, rank=8), attention=kt.Shapeshifter(rank=4),
                        ffn=kt.KPD(rank=2, block_size=(4, 4)), init="svd")
    ```
    """

    embedding: MethodSpec | None = field(default=None, metadata={"help": "Spec for the input token embedding."})
    attention: MethodSpec | None = field(default=None, metadata={"help": "Spec for linears inside attention modules."})
    ffn: MethodSpec | None = field(
        default=None, metadata={"help": "Spec for the other linears of transformer blocks."}
    )
    lm_head: MethodSpec | None = field(
        default=None, metadata={"help": "Spec for an untied output head (a tied head shares the embedding's factors)."}
    )
    untie_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Give an output head tied to the input embedding its own weight: it keeps the dense weight (or "
            "follows lm_head=) while only the embedding is factorized, as word2ket compresses only the input "
            "embedding (Panahi et al., section 3.5). False: a tied head shares the compressed embedding's factors."
        },
    )
    default: MethodSpec | None = field(
        default=None, metadata={"help": "Spec for targeted linears whose role has no spec (e.g. with 'all-linear')."}
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "Restrict compression to these modules: regex string, list of names, 'all-linear'."},
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Never compress these modules (same syntax as target_modules)."}
    )
    rules: dict[str, MethodSpec | None] = field(
        default_factory=dict, metadata={"help": "Pattern -> spec (None keeps dense); first match wins."}
    )
    init: str = field(
        default="svd",
        metadata={
            "help": "'svd': best Frobenius approximation of the dense weights; 'calibrated': best approximation "
            "of the layer outputs on calibration data (compress_model(..., calibration_data=)); 'random'."
        },
    )
    calibration_time_ratio: float | None = field(
        default=CALIBRATED_TIME_RATIO,
        metadata={
            "help": "init='calibrated': the Kronecker-sum solvers refine each layer for about this many times its "
            "svd fit's time; None: their full sweep budget (slower, better, independent of machine load)."
        },
    )
    version: int = field(default=1, metadata={"help": "Format version of this config."})
    modules: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Filled by compress_model: resolved structure per replaced module (do not set by hand)."},
    )
    quant_method: str = field(default=QUANT_METHOD, metadata={"help": "transformers quantization method name."})

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"KronConfig: quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"KronConfig: format version {self.version} is not supported by this kron_transformers "
                f"(version {CONFIG_VERSION}); upgrade kron_transformers"
            )
        for name in (*ROLES, "default"):
            setattr(self, name, _spec_or_none(getattr(self, name), name))
        if not isinstance(self.rules, dict):
            raise TypeError(f"KronConfig.rules: expected a dict pattern -> spec, got {type(self.rules).__name__}")
        self.rules = {str(k): _spec_or_none(v, f"rules[{k!r}]") for k, v in self.rules.items()}
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not all(isinstance(item, str) for item in value):
                    raise TypeError(f"KronConfig.{name}: expected a string or a list of strings, got {value!r}")
                setattr(self, name, list(value))
        if not isinstance(self.untie_lm_head, bool):
            raise TypeError(f"KronConfig.untie_lm_head: expected True or False, got {self.untie_lm_head!r}")
        if self.init not in INITS:
            raise ValueError(f"KronConfig.init: expected one of {INITS}, got {self.init!r}")
        ratio = self.calibration_time_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
            raise ValueError(
                f"KronConfig.calibration_time_ratio: expected a positive number or None (no time cap), got {ratio!r}"
            )
        if not any(getattr(self, name) is not None for name in (*ROLES, "default")) and not any(
            spec is not None for spec in self.rules.values()
        ):
            raise ValueError(
                "KronConfig: no method given; set at least one of embedding=, attention=, ffn=, "
                "lm_head=, default= or rules="
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in (*ROLES, "default"):
            spec = getattr(self, name)
            data[name] = spec.to_dict() if spec is not None else None
        data["rules"] = {k: (v.to_dict() if v is not None else None) for k, v in self.rules.items()}
        return data

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from ``to_dict()`` output; extra ``kwargs`` naming fields override them (transformers API)."""
        config = cls(**{**config_dict, **{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__}})
        unused = {k: v for k, v in kwargs.items() if k not in cls.__dataclass_fields__}
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> KronConfig:
        return cls.from_dict(json.loads(text))


@register_spec
@dataclass
class TensorTrain(MethodSpec):
    """TT-Rec (Yin et al., section 3): the embedding table as a tensor train of ``num_cores`` cores.

    ``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]``, rows built on demand.
    Embeddings only (a tied output head shares the cores). Everything has a default, so
    ``kt.TensorTrain()`` fits any table: automatic shapes (vocabulary padded, embedding dimension
    factored exactly) and TT rank 16, or the largest uniform rank meeting ``compression=``.

    ```py
    kt.KronConfig(embedding=kt.TensorTrain(tt_ranks=8))
    kt.KronConfig(embedding=kt.TensorTrain(num_cores=4, compression=50), init="random")
    ```
    """

    targets: ClassVar[frozenset[str]] = frozenset({EMBEDDING})
    paper: ClassVar[str] = f"{YIN_ET_AL}, section 3"

    rank: int | None = field(default=None, metadata={"help": "Unused: set tt_ranks=."})
    num_cores: int = field(default=3, metadata={"help": "Number d of TT cores (>= 2; the paper uses 2-4)."})
    tt_ranks: int | list[int] | None = field(
        default=None,
        metadata={"help": f"TT rank of every inner bond (int) or one per bond; {DEFAULT_TT_RANK} when unset."},
    )
    tt_shapes: list[list[int]] | None = field(
        default=None, metadata={"help": "Explicit (m_k, n_k) per core; automatic (see tt_shapes()) when None."}
    )
    init: str = field(
        default=SAMPLED_GAUSSIAN,
        metadata={"help": f"Core distribution for KronConfig(init='random'): one of {TT_INITS}."},
    )
    cache_fraction: float = field(
        default=0.0, metadata={"help": "Share of the rows kept uncompressed in the LFU cache (Yin et al., 4.2)."}
    )
    cache_warmup_steps: int = field(default=100, metadata={"help": "Training steps counted before the first fill."})
    cache_refresh_every: int = field(default=1000, metadata={"help": "Steps between cache refills (0: never)."})
    cache_write_back_steps: int = field(
        default=20, metadata={"help": "L-BFGS iterations writing evicted rows back into the cores (0: discard)."}
    )

    def __post_init__(self) -> None:
        if self.rank is not None:
            raise ValueError("TensorTrain: set tt_ranks= (an int or one int per inner bond), not rank=")
        if self.tt_ranks is not None and self.compression is not None:
            raise ValueError("TensorTrain: give tt_ranks= or compression=, not both")
        if self.compression is not None and not (isinstance(self.compression, (int, float)) and self.compression > 1):
            raise ValueError(f"TensorTrain: compression must be a number > 1, got {self.compression!r}")
        if not isinstance(self.num_cores, int) or isinstance(self.num_cores, bool) or self.num_cores < 2:
            raise ValueError(f"TensorTrain: num_cores must be an int >= 2, got {self.num_cores!r}")
        if isinstance(self.tt_ranks, (list, tuple)):
            self.tt_ranks = list(self.tt_ranks)
            if len(self.tt_ranks) != self.num_cores - 1:
                raise ValueError(
                    f"TensorTrain: {len(self.tt_ranks)} tt_ranks given for num_cores={self.num_cores}; give one int "
                    f"or {self.num_cores - 1} (one per inner bond)"
                )
        if self.tt_ranks is not None:
            ranks = self.tt_ranks if isinstance(self.tt_ranks, list) else [self.tt_ranks]
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
                raise ValueError(f"TensorTrain: tt_ranks must be a positive int or a list of them: {self.tt_ranks!r}")
        if self.tt_shapes is not None:
            self.tt_shapes = [list(shape) for shape in self.tt_shapes]
            if len(self.tt_shapes) != self.num_cores:
                raise ValueError(
                    f"TensorTrain: {len(self.tt_shapes)} tt_shapes given for num_cores={self.num_cores}; "
                    f"give one (m_k, n_k) pair per core"
                )
        if self.init not in TT_INITS:
            raise ValueError(f"TensorTrain: init must be one of {TT_INITS}, got {self.init!r}")
        if not isinstance(self.cache_fraction, (int, float)) or not 0.0 <= self.cache_fraction <= 1.0:
            raise ValueError(f"TensorTrain: cache_fraction must be in [0, 1], got {self.cache_fraction!r}")
        for name in ("cache_warmup_steps", "cache_refresh_every", "cache_write_back_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TensorTrain: {name} must be an int >= 0, got {value!r}")

    def resolve(self, rows: int, cols: int, target: str, module_name: str) -> dict[str, Any]:
        self.check_target(target, module_name, rows, cols)
        if self.tt_shapes is not None:
            shapes = validate_factor_shapes(self.tt_shapes, rows, cols, module_name)
        else:
            shapes = tuple(tt_shapes(rows, cols, self.num_cores))
        if self.compression is not None:
            bonds = self.num_cores - 1
            rank = self._rank_for_budget(
                lambda r: tt_num_parameters(shapes, [min(r, m) for m in max_tt_ranks(shapes)]),
                max(max_tt_ranks(shapes)),
                rows,
                cols,
                module_name,
            )
            ranks = resolve_tt_ranks([rank] * bonds, shapes, module_name)
        else:
            requested = self.tt_ranks if self.tt_ranks is not None else DEFAULT_TT_RANK
            ranks = resolve_tt_ranks(requested, shapes, module_name)
        logger.info("%s: TensorTrain shapes %s, ranks %s", module_name, [list(s) for s in shapes], ranks)
        structure: dict[str, Any] = {
            "factorization": "tensor_train",
            "tt_shapes": [list(s) for s in shapes],
            "tt_ranks": ranks,
            "init": self.init,
        }
        cache_size = round(self.cache_fraction * rows)
        if cache_size:
            structure.update(
                cache_size=cache_size,
                cache_warmup_steps=self.cache_warmup_steps,
                cache_refresh_every=self.cache_refresh_every,
                cache_write_back_steps=self.cache_write_back_steps,
            )
        return structure
