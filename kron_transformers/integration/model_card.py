"""Model cards for compressed checkpoints, rendered from ``model_cards/kron_transformers.md``."""

from __future__ import annotations

import os
from collections import defaultdict
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from torch import nn

from ..config import SPECS
from ..report import report
from ..surgery import applied_config


TEMPLATE_NAME = "kron_transformers.md"


def _template() -> Template:
    """The card template: shipped as package data ``kron_transformers.model_cards``, sourced from ``model_cards/``."""
    return Template(resources.files("kron_transformers.model_cards").joinpath(TEMPLATE_NAME).read_text("utf-8"))


def _base_model(model: nn.Module, base_model: str | None) -> str | None:
    if base_model is not None:
        return base_model
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    looks_like_hub_id = name.count("/") == 1 and not os.path.exists(name)
    return name if looks_like_hub_id else None


def _evaluation_section(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    rows = "\n".join(
        f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in metrics.items()
    )
    return f"## Evaluation\n\n| metric | value |\n| --- | ---: |\n{rows}\n"


def render_model_card(
    model: nn.Module,
    repo_id: str | None = None,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    tags: list[str] | None = None,
) -> str:
    """The card text: YAML front matter (library, tags, base model), parameters per role, methods, loading.

    ``tags`` are added to the card's own (``kron_transformers``, ``kronecker`` and each method).
    """
    config = applied_config(model)
    if config is None:
        raise ValueError("render_model_card: the model is not compressed; call kron_transformers.compress_model first")
    summary = report(model)
    by_role: dict[str, list] = defaultdict(list)
    by_method: dict[str, list] = defaultdict(list)
    for row in summary.modules:
        by_role[row.role].append(row)
        by_method[row.method].append(row)
    role_rows = "\n".join(
        f"| {role} | {len(rows)} | {sum(r.dense_parameters for r in rows):,} | "
        f"{sum(r.compressed_parameters for r in rows):,} | "
        f"{sum(r.dense_parameters for r in rows) / max(sum(r.compressed_parameters for r in rows), 1):.1f}× |"
        for role, rows in sorted(by_role.items())
    )
    method_rows = "\n".join(
        f"| {method} | {len(rows)} | {', '.join(sorted({r.structure for r in rows}))} | {SPECS[method].paper} |"
        for method, rows in sorted(by_method.items())
    )
    all_tags = ["kron_transformers", *(tags or []), "kronecker", *sorted(m.lower() for m in by_method)]
    base = _base_model(model, base_model)
    model_class = type(model).__name__
    tied = "\n".join(
        f"The output head `{head}` is tied to `{embedding}` and shares its factors."
        for head, embedding in summary.tied.items()
    )
    tied += "\n".join(
        f"The output head `{head}` was tied to `{embedding}` and has its own weight (`untie_lm_head=True`)."
        for head, embedding in summary.untied.items()
    )
    return _template().substitute(
        tags="\n".join(f"- {tag}" for tag in all_tags),
        base_model_line=f"base_model: {base}" if base else "",
        title=repo_id or f"{model_class} (kron_transformers)",
        architecture=f"`{model_class}`" + (f" from `{base}`" if base else ""),
        total_before=f"{summary.total_before:,}",
        total_after=f"{summary.total_after:,}",
        ratio=f"{summary.ratio:.2f}",
        role_rows=role_rows,
        tied_note=tied,
        method_rows=method_rows,
        model_class=model_class,
        repo_id=repo_id or "path/to/checkpoint",
        evaluation=_evaluation_section(metrics),
    )


def write_model_card(
    model: nn.Module,
    folder: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write (or refresh) ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(model, repo_id, base_model, metrics, tags), encoding="utf-8")
    return path
