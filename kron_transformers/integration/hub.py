"""``push_to_hub`` for compressed models: weights, config and the kron model card in one commit."""

from __future__ import annotations

import functools
import tempfile
from typing import Any

from huggingface_hub import HfApi
from torch import nn

from .model_card import write_model_card


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
):
    """Save ``model`` (compressed) with ``save_pretrained``, render its model card, upload both.

    Same keywords as transformers' ``push_to_hub`` plus ``base_model`` and ``metrics`` (shown in
    the card). Compressed models get this as their ``model.push_to_hub``, so the card is the
    kron card rather than transformers' generic one.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        write_model_card(model, folder, repo_id=repo_id, base_model=base_model, metrics=metrics, tags=tags)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload compressed model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def bind_push_to_hub(model: nn.Module) -> None:
    """Make ``model.push_to_hub(...)`` upload the kron model card (instance attribute, undone by unbinding)."""
    model.push_to_hub = functools.partial(push_to_hub, model)


def unbind_push_to_hub(model: nn.Module) -> None:
    if "push_to_hub" in model.__dict__:
        del model.__dict__["push_to_hub"]
