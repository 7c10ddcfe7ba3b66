"""The order-2 Kronecker-sum shapes the fused linear kernels meet: every preset in ``recipes/configs`` and
BERT-base / Llama-style layers, resolved by the library's own specs (``MethodSpec.resolve``) on each weight.

A shape is ``KronShape(label, rank, a1, b1, a2, b2, kpd)``: ``W = sum_k (S ⊙) A_k ⊗ B_k`` with ``A_k: (a1, b1)``,
``B_k: (a2, b2)``. Embeddings contribute their tied output head (``kron_matmul`` with ``W = E``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import yaml
from transformers import AutoConfig

import kron_transformers as kt
from kron_transformers.config import EMBEDDING, LINEAR, MethodSpec


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIG_DIR = RECIPES / "configs"
sys.path.insert(0, str(RECIPES))

from image_classification import SMALL_VIT  # noqa: E402 (the no-argument recipes' small models)
from recipe_kit.seq2seq import SMALL_T5  # noqa: E402


SMALL_MODELS = {"t5": SMALL_T5, "vit": SMALL_VIT}
SMALL_VOCAB = 1000  # assumed size of the tokenizer the small recipes train on their built-in data
T5_SMALL_VOCAB = 32100  # google-t5/t5-small's tokenizer


class KronShape(NamedTuple):
    label: str
    rank: int
    a1: int
    b1: int
    a2: int
    b2: int
    kpd: bool


def _model_weights(defaults: dict, preset: str) -> dict[str, list[tuple[int, int]]]:
    """``target -> [(rows, cols)]`` of the preset's model (its config and overrides, or the recipe's small one)."""
    model_type = defaults.get("model_config") or ("vit" if "kpd" in preset else "t5")
    if "model_config" in defaults:
        overrides = dict(item.split("=") for item in defaults.get("config_overrides", "").split(",") if item)
        config = AutoConfig.for_model(
            model_type, **{k: float(v) if "." in v else int(v) for k, v in overrides.items()}
        )
    else:
        config = AutoConfig.for_model(**SMALL_MODELS[model_type])
    if model_type == "t5":
        inner = config.num_heads * config.d_kv
        vocab = defaults.get("tokenizer_vocab_size", T5_SMALL_VOCAB if "model_config" in defaults else SMALL_VOCAB)
        return {
            "attention": [(inner, config.d_model), (config.d_model, inner)],
            "ffn": [(config.d_ff, config.d_model), (config.d_model, config.d_ff)],
            "embedding": [(vocab, config.d_model)],
        }
    hidden, intermediate = config.hidden_size, config.intermediate_size
    return {"attention": [(hidden, hidden)], "ffn": [(intermediate, hidden), (hidden, intermediate)], "embedding": []}


def _resolved(label: str, spec: MethodSpec, rows: int, cols: int, target: str) -> KronShape | None:
    structure = spec.resolve(rows, cols, target, label)
    if structure["factorization"] == "kronecker_sum" and len(structure["factor_shapes"]) == 2:
        (a1, b1), (a2, b2) = structure["factor_shapes"]
        return KronShape(label, structure["rank"], a1, b1, a2, b2, False)
    if structure["factorization"] == "kpd":
        m2, n2 = structure["block_size"]
        return KronShape(label, structure["rank"], rows // m2, cols // n2, m2, n2, True)
    return None


def preset_shapes() -> list[KronShape]:
    """Every distinct order-2 Kronecker-sum linear (and tied head) of every preset in ``recipes/configs``."""
    shapes: dict[tuple, KronShape] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not data.get("compression"):
            continue
        config = kt.KronConfig.from_dict(data["compression"])
        weights = _model_weights(data.get("defaults") or {}, path.stem)
        for target, sizes in weights.items():
            spec = getattr(config, target, None)
            if spec is None:
                continue
            for rows, cols in sizes:
                kind = EMBEDDING if target == "embedding" else LINEAR
                shape = _resolved(f"{path.stem} {target} {rows}x{cols}", spec, rows, cols, kind)
                if shape is not None:
                    shapes.setdefault(shape[1:], shape)
    return list(shapes.values())


def large_layer_shapes() -> list[KronShape]:
    """BERT-base (768, 3072) and Llama-7B-style (4096, 11008) layers: Shapeshifter rank 16 and KPD 4x4 rank 4."""
    shapes = []
    for rows, cols in [(768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (4096, 11008)]:
        for spec in (kt.Shapeshifter(rank=16), kt.KPD(rank=4, block_size=[4, 4])):
            shapes.append(_resolved(f"{spec.method} {rows}x{cols}", spec, rows, cols, LINEAR))
    return shapes


TT_RANKS = (8, 16, 32, 64)
LARGE_VOCABULARIES = {"bert-base": (30522, 768), "llama-7b": (32000, 4096)}


class TTShape(NamedTuple):
    label: str
    cores: tuple[tuple[int, int, int, int], ...]  # (R_{k-1}, m_k, n_k, R_k) per core


def tt_embedding_shapes(ranks: tuple[int, ...] = TT_RANKS, num_cores: tuple[int, ...] = (3, 4)) -> list[TTShape]:
    """TT-Rec cores (``kt.TensorTrain`` resolved on the table) for the embedding of every preset's model and the
    BERT-base / Llama-7B vocabularies, at each TT rank and number of cores."""
    tables: dict[tuple[int, int], str] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        defaults = yaml.safe_load(path.read_text()).get("defaults") or {}
        for rows, cols in _model_weights(defaults, path.stem)["embedding"]:
            tables.setdefault((rows, cols), path.stem)
    tables.update({size: name for name, size in LARGE_VOCABULARIES.items()})
    shapes = []
    for (rows, cols), name in tables.items():
        for cores in num_cores:
            for rank in ranks:
                spec = kt.TensorTrain(tt_ranks=rank, num_cores=cores)
                structure = spec.resolve(rows, cols, EMBEDDING, name)
                bonds = [1, *structure["tt_ranks"], 1]
                core_shapes = tuple((bonds[k], m, n, bonds[k + 1]) for k, (m, n) in enumerate(structure["tt_shapes"]))
                shapes.append(TTShape(f"{name} embedding {rows}x{cols} d={cores} rank {rank}", core_shapes))
    return shapes


class GatherShape(NamedTuple):
    label: str
    factors: tuple[tuple[int, int, int], ...]  # (r, a_j, b_j) per Kronecker factor


def embedding_gather_shapes() -> list[GatherShape]:
    """Kronecker-sum embeddings whose rows the fused gather builds: every preset's (Shapeshifter, word2ketXS) and
    word2ketXS of order 2 and 4, ranks 10 and 256, on the BERT-base / Llama-7B vocabularies."""
    shapes = [
        GatherShape(shape.label, ((shape.rank, shape.a1, shape.b1), (shape.rank, shape.a2, shape.b2)))
        for shape in preset_shapes()
        if " embedding " in shape.label
    ]
    for name, (rows, cols) in LARGE_VOCABULARIES.items():
        for order in (2, 4):
            for rank in (10, 256):
                structure = kt.Word2KetXS(order=order, rank=rank).resolve(rows, cols, EMBEDDING, name)
                factors = tuple((structure["rank"], a, b) for a, b in structure["factor_shapes"])
                shapes.append(GatherShape(f"{name} word2ketXS order {order} rank {rank} {rows}x{cols}", factors))
    return shapes
