"""Role detection on any Hugging Face model, without a per-architecture table.

- ``embedding``: the module returned by ``get_input_embeddings()`` and every embedding that
  shares its weight tensor (tied encoder/decoder copies).
- ``lm_head``: the module returned by ``get_output_embeddings()``; it is *tied* when its
  weight is the input embedding's weight tensor (identity, never names).
- ``attention``: linears below a module whose class name contains ``Attention``.
- ``ffn``: the other linears inside a transformer block, a ``ModuleList`` element that
  contains an attention module.
- ``other``: everything else (poolers, classifiers, position embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


EMBEDDING_ROLE = "embedding"
ATTENTION_ROLE = "attention"
FFN_ROLE = "ffn"
LM_HEAD_ROLE = "lm_head"
OTHER_ROLE = "other"


def conv1d_class() -> type[nn.Module] | None:
    """transformers' GPT-2 style ``Conv1D`` (weight stored in x out), if transformers imports."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass that keeps its forward) or transformers ``Conv1D``."""
    conv1d = conv1d_class()
    if conv1d is not None and type(module) is conv1d:
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return conv1d is not None and type(module) is conv1d


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def is_attention_module(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


@dataclass
class ModuleInfo:
    """One unique module of the model: all the names it is reachable under, and its role."""

    module: nn.Module
    names: list[str] = field(default_factory=list)
    role: str = OTHER_ROLE

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class ModelRoles:
    """The result of role detection over a model."""

    modules: dict[int, ModuleInfo]
    input_embedding: nn.Module | None
    output_embedding: nn.Module | None
    tied_head: bool

    def info(self, module: nn.Module) -> ModuleInfo:
        return self.modules[id(module)]


def _safe_call(model: nn.Module, method: str) -> nn.Module | None:
    getter = getattr(model, method, None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def detect_roles(model: nn.Module) -> ModelRoles:
    """Classify every linear and embedding module of ``model`` (see the module docstring)."""
    by_path: dict[str, nn.Module] = {}
    infos: dict[int, ModuleInfo] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        by_path[path] = module
        infos.setdefault(id(module), ModuleInfo(module)).names.append(path)

    blocks: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(is_attention_module(sub) for sub in child.modules()):
                    blocks.add(id(child))

    input_embedding = _safe_call(model, "get_input_embeddings")
    output_embedding = _safe_call(model, "get_output_embeddings")
    input_weight = getattr(input_embedding, "weight", None) if input_embedding is not None else None
    tied = (
        output_embedding is not None
        and input_weight is not None
        and getattr(output_embedding, "weight", None) is input_weight
    )

    for info in infos.values():
        module = info.module
        if module is output_embedding:
            info.role = LM_HEAD_ROLE
        elif is_embedding(module) and input_weight is not None and module.weight is input_weight:
            info.role = EMBEDDING_ROLE
        elif is_linear(module):
            ancestors = [
                by_path[".".join(info.name.split(".")[:depth])] for depth in range(1, info.name.count(".") + 1)
            ]
            if any(is_attention_module(a) for a in ancestors):
                info.role = ATTENTION_ROLE
            elif any(id(a) in blocks for a in ancestors):
                info.role = FFN_ROLE
    return ModelRoles(infos, input_embedding, output_embedding, tied)
