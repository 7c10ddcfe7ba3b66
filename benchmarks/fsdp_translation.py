"""FSDP2 run of the translation recipe: 2 CPU processes (gloo) against one process with the same global batch.

The recipe's own task (``recipes/translation.py``'s defaults: the small T5 built from a config, the built-in
corpus and BPE tokenizer, the ``small_shapeshifter`` preset, AdamW, inverse square-root warm-up, gradient clipping
at 1, label smoothing 0.1), trained for ``--steps`` optimizer steps three ways:

- one process on the whole global batch (``--global_batch`` examples per step);
- two processes under FSDP2 (``fully_shard`` on every T5 block, then on the root, which keeps the shared embedding
  and the tied head, as ``recipes/accelerate_fsdp.yaml`` asks Accelerate to wrap), each on half of every global
  batch, with a sharded ``torch.distributed.checkpoint`` of model, optimizer and schedule at ``--resume_at``;
- two processes resumed from that checkpoint for the remaining steps.

Accelerate 1.x prepares FSDP only for accelerator devices (on CPU it falls back to DDP), so this script drives
``fully_shard`` itself with the recipe's model, data, optimizer and schedule. Two deviations from the recipe's
loop, both needed for the runs to compute the same function: dropout is 0 (a dropout mask depends on how the batch
is split), and the loss is normalized by the global batch's target-token count (the loop divides by each process's
own count, so two processes weight tokens differently from one). Prints one row per step and the largest
differences against the tolerance of the recipes' DDP test (rtol 1e-4, atol 1e-5).

    python benchmarks/fsdp_translation.py                 # 20 steps, checkpoint at step 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RTOL, ATOL = 1e-4, 1e-5  # tests/test_recipes.py's DDP comparison


def build(global_batch: int, world: int, steps: int):
    """The translation recipe's arguments and task (model compressed by its default preset), seeded as the recipe."""
    sys.path.insert(0, str(RECIPES))
    import translation
    from recipe_kit import builtin
    from recipe_kit.arguments import IMAGE_ONLY, parse_arguments
    from recipe_kit.loop import seed_run
    from recipe_kit.metrics import bleu
    from recipe_kit.seq2seq import SMALL_T5, seq2seq_task

    argv = [
        "--config_overrides", "dropout_rate=0", "--max_steps", str(steps),
        "--per_device_train_batch_size", str(global_batch // world),
    ]  # fmt: skip
    arguments = parse_arguments(translation.DEFAULTS, argv, unused=IMAGE_ONLY)
    seed_run(arguments.train)
    task = seq2seq_task("translation", arguments, builtin.translation, ("source", "target"), bleu, SMALL_T5)
    return arguments.train, task


class Run:
    """One training run: model, optimizer and schedule as the recipe builds them, fed global batch ``step``."""

    def __init__(self, args, task, model, world: int, rank: int, global_batch: int, steps: int) -> None:
        from recipe_kit.loop import EpochShuffleSampler
        from recipe_kit.optim import build_optimizer, build_scheduler

        self.args, self.task, self.model = args, task, model
        self.world, self.rank, self.global_batch = world, rank, global_batch
        self.optimizer = build_optimizer(model, args)
        self.scheduler = build_scheduler(self.optimizer, args, steps)
        self.order = list(EpochShuffleSampler(len(task.train_data), args.seed))

    def batch(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This process's part of global batch ``step`` and the global batch's count of target tokens."""
        indices = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        items = [self.task.train_data[i] for i in indices]
        tokens = torch.tensor(float(sum(len(target) for _, target, _ in items)))
        local = self.global_batch // self.world
        return self.task.collate_train(items[self.rank * local : (self.rank + 1) * local]), tokens

    def train(self, steps: range) -> list[float]:
        import torch.distributed as dist
        import torch.nn.functional as F

        import kron_transformers as kt

        losses = []
        self.model.train()
        for step in steps:
            batch, tokens = self.batch(step)
            labels = batch["labels"]
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            summed = F.cross_entropy(
                logits.logits.flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=self.args.label_smoothing,
                reduction="sum",
            )
            (summed * self.world / tokens).backward()  # FSDP averages gradients over the processes
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            kt.on_train_step(self.model, step + 1, self.optimizer)
            summed = summed.detach()
            if self.world > 1:
                dist.all_reduce(summed)
            losses.append(float(summed / tokens))
        return losses


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block)
    return fully_shard(model)


def worker(output: Path, steps: int, resume_at: int, global_batch: int) -> None:
    """Runs under ``torch.distributed.run`` with 2 processes; rank 0 also runs the single-process reference."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor, Shard
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(1)
    os.environ["KRON_TRANSFORMERS_COST_MODEL"] = "factored"  # one matmul path for both batch splittings
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {}
    if rank == 0:
        args, task = build(global_batch, 1, steps)
        single = Run(args, task, task.model, 1, 0, global_batch, steps)
        start = time.perf_counter()
        result["single_losses"] = single.train(range(steps))
        result["single_seconds"] = time.perf_counter() - start
        single_state = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}

    args, task = build(global_batch, world, steps)
    run = Run(args, task, shard(task.model), world, rank, global_batch, steps)
    factors = [p for name, p in run.model.named_parameters() if ".factorization." in name]
    result["factors_sharded"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in factors)
    result["tied"] = run.model.lm_head.factorization is run.model.shared.factorization
    start = time.perf_counter()
    losses = run.train(range(resume_at))
    state = {
        "model": get_model_state_dict(run.model),
        "optimizer": get_optimizer_state_dict(run.model, run.optimizer),
        "scheduler": run.scheduler.state_dict(),
    }
    dcp.save(state, checkpoint_id=str(output / "sharded"))
    losses += run.train(range(resume_at, steps))
    result["fsdp_seconds"] = time.perf_counter() - start
    result["fsdp_losses"] = losses
    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {name: tensor.clone() for name, tensor in full.items()}  # rank 0 holds the gathered tensors
    dist.barrier()
    if rank == 0:
        run.model.save_pretrained(output / "full", state_dict=full)

    args, task = build(global_batch, world, steps)
    resumed = Run(args, task, shard(task.model), world, rank, global_batch, steps)
    state = {
        "model": get_model_state_dict(resumed.model),
        "optimizer": get_optimizer_state_dict(resumed.model, resumed.optimizer),
        "scheduler": resumed.scheduler.state_dict(),
    }
    dcp.load(state, checkpoint_id=str(output / "sharded"))
    set_model_state_dict(resumed.model, state["model"])
    set_optimizer_state_dict(resumed.model, resumed.optimizer, state["optimizer"])
    resumed.scheduler.load_state_dict(state["scheduler"])
    result["resumed_losses"] = resumed.train(range(resume_at, steps))

    dist.barrier()
    if rank == 0:
        reloaded = AutoModelForSeq2SeqLM.from_pretrained(output / "full")
        reloaded_state = reloaded.state_dict()
        result["reloaded_tied"] = reloaded.lm_head.factorization is reloaded.shared.factorization
        result["same_keys"] = reloaded_state.keys() == single_state.keys()
        result["max_parameter_difference"] = max(
            float((reloaded_state[name] - tensor).abs().max()) for name, tensor in single_state.items()
        )
        (output / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resume_at", type=int, default=10)
    parser.add_argument("--global_batch", type=int, default=32, help="examples per step (the recipe's batch size)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.resume_at < args.steps or args.global_batch % 2:
        sys.exit("need 0 < --resume_at < --steps and an even --global_batch")
    if args.worker:
        return worker(Path(args.worker), args.steps, args.resume_at, args.global_batch)

    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
            "--steps", str(args.steps), "--resume_at", str(args.resume_at),
            "--global_batch", str(args.global_batch), "--worker", folder,
        ]  # fmt: skip
        environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            sys.exit(done.stderr[-4000:])
        result = json.loads((Path(folder) / "result.json").read_text())

    single, fsdp = result["single_losses"], result["fsdp_losses"]
    resumed = [None] * args.resume_at + result["resumed_losses"]
    print("| step | one process | FSDP, 2 processes | FSDP resumed at step %d |" % args.resume_at)
    print("| ---: | ---: | ---: | ---: |")
    for step, (one, two, again) in enumerate(zip(single, fsdp, resumed), start=1):
        print(f"| {step} | {one:.6f} | {two:.6f} | {'' if again is None else f'{again:.6f}'} |")
    worst = max(abs(two - one) - (ATOL + RTOL * abs(one)) for one, two in zip(single, fsdp))
    resume = max(abs(a - b) for a, b in zip(result["resumed_losses"], fsdp[args.resume_at :]))
    print()
    print(f"largest |FSDP - one process| loss difference: {max(abs(a - b) for a, b in zip(single, fsdp)):.2e}")
    print(f"within the DDP test's tolerance (rtol {RTOL:g}, atol {ATOL:g}): {'yes' if worst <= 0 else 'NO'}")
    print(f"largest |resumed - uninterrupted| loss difference: {resume:.2e}")
    print(
        f"factors sharded (DTensor, Shard(0)): {result['factors_sharded']}; tied head shares the embedding's "
        f"factors: {result['tied']}, after reloading the gathered checkpoint: {result['reloaded_tied']}"
    )
    print(
        f"gathered final parameters vs one process: same keys {result['same_keys']}, largest difference "
        f"{result['max_parameter_difference']:.2e}"
    )
    print(f"seconds: one process {result['single_seconds']:.1f}, FSDP (both halves) {result['fsdp_seconds']:.1f}")


if __name__ == "__main__":
    main()
