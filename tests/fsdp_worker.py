"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: a compressed T5 trained with FSDP2 on CPU (gloo).

Each transformer block is one ``fully_shard`` unit and the root holds the embeddings and the tied head,
as Accelerate's ``TRANSFORMER_BASED_WRAP`` does. Rank 0 also trains an unsharded copy on the whole global
batch. Writes ``result.json`` into the folder given as the only argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard


sys.path.insert(0, str(Path(__file__).parent))

from conftest import VOCAB, build_model  # noqa: E402
from test_surgery import METHODS  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

import kron_transformers as kt  # noqa: E402


STEPS, RESUME_AT, GLOBAL_BATCH = 4, 2, 8


def compressed_t5() -> nn.Module:
    model = kt.compress_model(build_model("t5"), METHODS["shapeshifter"]())
    return model.eval()  # no dropout: the sharded and the single run must compute the same function


def global_batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(3, VOCAB, (GLOBAL_BATCH, 7), generator=generator),
        "labels": torch.randint(3, VOCAB, (GLOBAL_BATCH, 5), generator=generator),
    }


def shard(model: nn.Module) -> nn.Module:
    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block)
    return fully_shard(model)


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, steps, rank: int, world: int) -> list[float]:
    losses = []
    for step in steps:
        batch = global_batch(step)
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        loss = model(**local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def main(output: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    result: dict = {}
    if rank == 0:
        single = compressed_t5()
        result["single_losses"] = train(single, optimizer_for(single), range(STEPS), 0, 1)
        single.save_pretrained(output / "single")

    model = shard(compressed_t5())
    factors = [p for name, p in model.named_parameters() if ".factorization." in name]
    result["factors_sharded"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in factors)
    optimizer = optimizer_for(model)
    losses = train(model, optimizer, range(RESUME_AT), rank, world)
    sharded_state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(sharded_state, checkpoint_id=str(output / "sharded"))
    losses += train(model, optimizer, range(RESUME_AT, STEPS), rank, world)
    result["fsdp_losses"] = losses
    result["tied"] = model.lm_head.factorization is model.shared.factorization
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {name: tensor.clone() for name, tensor in full.items()}  # wait for the gathers (rank 0 holds them)
    dist.barrier()
    if rank == 0:
        model.save_pretrained(output / "full", state_dict=full)

    resumed = shard(compressed_t5())
    resumed_optimizer = optimizer_for(resumed)
    state = {"model": get_model_state_dict(resumed), "optimizer": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=str(output / "sharded"))
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    result["resumed_losses"] = train(resumed, resumed_optimizer, range(RESUME_AT, STEPS), rank, world)

    dist.barrier()
    if rank == 0:
        reloaded = AutoModelForSeq2SeqLM.from_pretrained(output / "full")
        result["reloaded_tied"] = reloaded.lm_head.factorization is reloaded.shared.factorization
        single_state, reloaded_state = single.state_dict(), reloaded.state_dict()
        result["same_keys"] = single_state.keys() == reloaded_state.keys()
        result["max_parameter_difference"] = max(
            float((reloaded_state[k] - v).abs().max()) for k, v in single_state.items()
        )
        (output / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
