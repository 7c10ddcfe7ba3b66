"""``report(model)``: parameters before/after per compressed module and in total."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .cce import EmbeddingCompression, embedding_compression_factor
from .config import KronConfig
from .modules import BlockSparseLinear, FactorizedEmbedding, FactorizedLinear, TiedFactorizedHead
from .surgery import KIND_EMBEDDING, KIND_TIED_HEAD, applied_config


@dataclass
class ModuleReport:
    """One compressed weight matrix."""

    name: str
    role: str
    method: str
    shape: tuple[int, int]
    structure: str
    dense_parameters: int
    compressed_parameters: int
    init_error: float | None
    output_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.dense_parameters / max(self.compressed_parameters, 1)


@dataclass
class CompressionReport:
    """Per-module rows plus model totals; ``str()`` renders a table."""

    modules: list[ModuleReport] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    untied: dict[str, str] = field(default_factory=dict)  # head -> the embedding it was tied to (untie_lm_head)
    total_before: int = 0
    total_after: int = 0
    embedding_compression: EmbeddingCompression | None = None

    @property
    def ratio(self) -> float:
        return self.total_before / max(self.total_after, 1)

    def __str__(self) -> str:
        with_init = any(m.init_error is not None for m in self.modules)  # none after init="random"
        with_outputs = any(m.output_error is not None for m in self.modules)
        header = ("module", "role", "method", "shape", "structure", "dense", "compressed", "ratio")
        header += ("init error",) * with_init + ("output error",) * with_outputs
        rows = [header]
        for m in self.modules:
            row = (
                m.name,
                m.role,
                m.method,
                f"{m.shape[0]}x{m.shape[1]}",
                m.structure,
                f"{m.dense_parameters:,}",
                f"{m.compressed_parameters:,}",
                f"{m.ratio:.1f}x",
            )
            row += (_error(m.init_error),) * with_init + (_error(m.output_error),) * with_outputs
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        if with_init:
            lines.append(INIT_ERROR_LEGEND)
        if with_outputs:
            lines.append(OUTPUT_ERROR_LEGEND)
        for head, embedding in self.tied.items():
            lines.append(f"{head}: tied to {embedding} (shares its factors)")
        for head, embedding in self.untied.items():
            kept = "compressed above" if any(m.name == head for m in self.modules) else "dense"
            lines.append(f"{head}: untied from {embedding} (untie_lm_head), its own weight, {kept}")
        if self.embedding_compression is not None:
            factor = self.embedding_compression
            lines.append(
                f"embedding compression (Tsang & Ahle): {factor.all_tables:.1f}x over all {factor.tables} tables, "
                f"{factor.largest_table:.1f}x on the largest"
            )
        change = f"{self.ratio:.2f}x smaller" if self.ratio >= 1 else f"{1 / self.ratio:.2f}x larger"
        lines.append(f"model parameters: {self.total_before:,} -> {self.total_after:,} ({change})")
        return "\n".join(lines)


INIT_ERROR_LEGEND = (
    "init error: ||W - W_hat||_F / ||W||_F, the relative Frobenius error of the initialized weight (blank: not fitted)"
)
OUTPUT_ERROR_LEGEND = (
    "output error: ||(W - W_hat) C^(1/2)||_F / ||W C^(1/2)||_F, C the calibration inputs' second moment (embeddings: "
    "rows weighted by token frequency); init='calibrated' minimizes this one, so its init error can exceed 1 "
    "(directions the inputs never excite are left free)"
)


def _error(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _describe_structure(structure: dict) -> str:
    if structure.get("factorization") == "cce":
        return f"{structure['num_columns']} columns, {structure['table_rows']} rows"
    if "nonzero_blocks" in structure:
        rows, cols = structure["block_size"]
        return f"block-sparse {rows}x{cols}, {structure['nonzero_blocks']} blocks"
    if "tt_ranks" in structure:
        shapes = " ⊗ ".join(f"{m}x{n}" for m, n in structure["tt_shapes"])
        cache = f", cache {structure['cache_size']} rows" if structure.get("cache_size") else ""
        return f"TT ranks {structure['tt_ranks']}, {shapes}{cache}"
    parts = [f"rank {structure['rank']}"]
    if "factor_shapes" in structure:
        parts.append(" ⊗ ".join(f"{a}x{b}" for a, b in structure["factor_shapes"]))
    if "block_sizes" in structure:
        parts.append("patterns " + ", ".join(f"{a}x{b}" for a, b in structure["block_sizes"]))
    if "block_size" in structure:
        parts.append(f"block {structure['block_size'][0]}x{structure['block_size'][1]}")
    if "leaf_dims" in structure:
        parts.append("leaves " + "x".join(str(q) for q in structure["leaf_dims"]))
    return ", ".join(parts)


def report(model: nn.Module) -> CompressionReport:
    """Parameters before/after for each compressed module and for the whole model.

    Rows follow the model's module order. For ``init="svd"``/``"calibrated"`` each row also carries the
    relative approximation error ``||W - W_hat||_F / ||W||_F`` measured when the module was initialized
    and, when calibration data was given, the relative output error ``||(W - W_hat) C^(1/2)||_F /
    ||W C^(1/2)||_F`` on that data (``C = E[x x^T]``); the table's last lines say which norm each column is.
    """
    config = applied_config(model)
    result = CompressionReport()
    result.total_after = sum(p.numel() for p in model.parameters() if p.is_floating_point())  # not TT cache ids
    if config is None:
        result.total_before = result.total_after
        return result
    saved = 0
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    in_model_order = sorted(config.modules.items(), key=lambda item: position.get(item[0], len(position)))
    for name, entry in in_model_order:  # config.json stores the records sorted by name
        if entry["kind"] == KIND_TIED_HEAD:
            result.tied[name] = entry["tied_to"]
            continue
        module = model.get_submodule(name)
        if isinstance(module, BlockSparseLinear):
            compressed = module.num_nonzeros()
        elif isinstance(module, (FactorizedLinear, FactorizedEmbedding)):
            compressed = module.factorization.num_parameters()
        else:
            raise ValueError(f"report: {name} is recorded as compressed but is a {type(module).__name__}")
        saved += entry["dense_parameters"] - compressed
        result.modules.append(
            ModuleReport(
                name=name,
                role=entry["role"],
                method=entry["method"],
                shape=tuple(entry["shape"]),
                structure=_describe_structure(entry["structure"]),
                dense_parameters=entry["dense_parameters"],
                compressed_parameters=compressed,
                init_error=entry.get("init_error"),
                output_error=entry.get("output_error"),
            )
        )
    result.total_before = result.total_after + saved
    untied = _untied_head(model, config)
    if untied is not None:  # the dense model held one table for the embedding and the head
        head, embedding, table_parameters = untied
        result.untied[head] = embedding
        result.total_before -= table_parameters
    if any(entry["kind"] == KIND_EMBEDDING for entry in config.modules.values()):
        result.embedding_compression = embedding_compression_factor(model)
    return result


def _untied_head(model: nn.Module, config: KronConfig) -> tuple[str, str, int] | None:
    """The output head ``untie_lm_head`` gave its own weight: its name, the embedding's, the table's size."""
    if not config.untie_lm_head or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None  # the model's config never tied the head
    try:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None or embedding is None or isinstance(head, TiedFactorizedHead):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(head)], names[id(embedding)], head.in_features * head.out_features
