"""The one training loop of the recipes, on Accelerate.

Launched with ``python`` or ``accelerate launch`` (DDP / FSDP unchanged): mixed precision and gradient
accumulation through ``Accelerator``; ``accelerator.save_state`` every ``--checkpointing_steps`` optimizer steps
into ``output_dir/checkpoints/step_N`` and ``--resume_from_checkpoint`` continuing at that step with the same data
order and random state; after every optimizer step, the KPD proximal l1 step (Zhu et al., eq. 4) when
``--kpd_l1 > 0`` and ``kt.on_train_step`` (TT-Rec cache, CCE re-clustering: any module defining it); trackers,
a progress bar (a log line every ``--logging_steps`` when stderr is not a terminal), then evaluation,
``results.json``, the model, its card and ``--push_to_hub``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import enable_full_determinism
from transformers.utils import logging as hf_logging

import kron_transformers as kt

from .arguments import RecipeArguments, TrainArguments
from .errors import RecipeError
from .optim import build_optimizer, build_scheduler


CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
RESULTS = "results.json"


@dataclass
class Task:
    """What a recipe contributes to the loop: the model, its data and how to train and evaluate it.

    ``evaluate(model, batches, accelerator, split)`` scores ``eval_split`` at the end and, with ``--eval_steps``,
    the validation split during training; the first metric it returns is the one early stopping watches.
    """

    name: str
    model: nn.Module
    train_data: Sequence
    eval_data: Sequence
    eval_split: str
    collate_train: Callable[[list], dict[str, torch.Tensor]]
    collate_eval: Callable[[list], dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[nn.Module, Iterable[dict[str, torch.Tensor]], Accelerator, str], dict[str, float]]
    save_preprocessing: Callable[[str], None]
    validation_data: Sequence
    collate_validation: Callable[[list], dict[str, torch.Tensor]]
    train_lengths: Sequence[int] | None = None  # per training example, for --group_by_length


class EpochShuffleSampler(Sampler[int]):
    """A permutation per epoch drawn from ``(seed, epoch)`` alone, so a resumed run sees the same order.

    With ``lengths``, the permutation is cut into chunks of 50 batches, each chunk sorted by length and cut into
    batches, and the full batches are shuffled (the one partial batch stays last): batches of similar lengths,
    less padding. The epoch is set by the loop (``use_epoch``), not through ``set_epoch``, which Accelerate's
    data loader calls with its own iteration count (0 again in a resumed run).
    """

    CHUNK_BATCHES = 50

    def __init__(
        self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int | None = None
    ) -> None:
        if lengths is not None and (len(lengths) != size or not batch_size):
            raise ValueError(f"EpochShuffleSampler: need {size} lengths and a batch size, got {len(lengths)}")
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        chunk = self.batch_size * self.CHUNK_BATCHES
        batches = []
        for start in range(0, self.size, chunk):
            part = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        partial = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + partial
        return iter([index for batch in shuffled for index in batch])


def make_accelerator(args: TrainArguments) -> Accelerator:
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
    )
    seed_run(args)
    return accelerator


def seed_run(args: TrainArguments) -> None:
    """Seed initialization, data order and dropout; with ``--full_determinism`` also deterministic algorithms."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", path.name)
    if match is None:
        raise RecipeError(f"--resume_from_checkpoint {path}: expected a {CHECKPOINTS}/step_N folder")
    return int(match.group(1))


def resolve_checkpoint(args: TrainArguments) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names (``latest``: the highest step in output_dir/checkpoints)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        folders = sorted(Path(args.output_dir, CHECKPOINTS).glob("step_*"), key=checkpoint_step)
        if not folders:
            raise RecipeError(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}/{CHECKPOINTS}")
        return folders[-1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise RecipeError(f"--resume_from_checkpoint {path}: no such folder")
    checkpoint_step(path)
    return path


def check_training_hooks(model: nn.Module, args: TrainArguments) -> None:
    if args.kpd_l1 > 0 and not kt.kpd.kpd_factorizations(model):
        raise RecipeError("--kpd_l1 needs KPD layers; use a KPD compression preset or set --kpd_l1 0")


def _stop_for_time(accelerator: Accelerator, start: float, budget: float | None) -> bool:
    """True on every process once the main process has used up ``budget`` seconds."""
    if budget is None:
        return False
    flag = torch.tensor(float(time.perf_counter() - start >= budget), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)


def train(task: Task, arguments: RecipeArguments, accelerator: Accelerator) -> dict[str, Any]:
    """Train ``task.model``, evaluate it, write everything under ``output_dir``; return the results dict."""
    args = arguments.train
    output_dir = Path(args.output_dir)
    checkpoint = resolve_checkpoint(args)
    check_training_hooks(task.model, args)
    summary = kt.report(task.model)
    if kt.applied_config(task.model) is not None:
        accelerator.print(summary)

    lengths = task.train_lengths if args.group_by_length else None
    sampler = EpochShuffleSampler(len(task.train_data), args.seed, lengths, args.per_device_train_batch_size)
    train_loader = DataLoader(
        task.train_data,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=task.collate_train,
        generator=torch.Generator().manual_seed(args.seed),  # its seed draws must not advance the global generator
    )
    eval_loader = DataLoader(task.eval_data, batch_size=args.per_device_eval_batch_size, collate_fn=task.collate_eval)
    validation_loader = DataLoader(
        task.validation_data, batch_size=args.per_device_eval_batch_size, collate_fn=task.collate_validation
    )
    optimizer = build_optimizer(task.model, args)
    model, optimizer, train_loader, eval_loader, validation_loader = accelerator.prepare(
        task.model, optimizer, train_loader, eval_loader, validation_loader
    )
    steps_per_epoch = max(1, math.ceil(len(train_loader) / args.gradient_accumulation_steps))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, args, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(_leave_out_tied_copies(accelerator))
    if args.report_to != "none":
        accelerator.init_trackers(task.name, config=_scalars(arguments.to_flat_dict()))

    completed = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        completed = checkpoint_step(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {completed}")
    batches_per_step = args.gradient_accumulation_steps
    epoch, skip = divmod(completed, steps_per_epoch)
    skip *= batches_per_step
    log_path = output_dir / TRAIN_LOG
    if accelerator.is_main_process and checkpoint is None:
        log_path.write_text("")
    unwrapped = accelerator.unwrap_model(model)
    interactive = sys.stderr.isatty()  # a log file gets a line every --logging_steps instead of a progress bar
    if not interactive:
        hf_logging.disable_progress_bar()  # nor transformers' "Writing model shards" bar on every save
    progress = tqdm(
        total=total_steps,
        initial=completed,
        desc=task.name,
        disable=not (interactive and accelerator.is_local_main_process),
    )
    start = time.perf_counter()
    step_losses: list[float] = []
    last_loss = float("nan")
    watch = EarlyStopping(args.early_stopping_patience)
    model.train()
    while (
        completed < total_steps and not watch.stop and not _stop_for_time(accelerator, start, args.max_train_seconds)
    ):
        sampler.use_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.loss(model, batch)
                accelerator.backward(loss)
                step_losses.append(loss.detach().float().item())
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed += 1
            if args.kpd_l1 > 0:
                adam = optimizer if args.optimizer == "adamw" else None  # LAMB: the plain threshold lr * l1
                kt.kpd.proximal_step(unwrapped, lr=learning_rate, strength=args.kpd_l1, optimizer=adam)
            hook_metrics = kt.on_train_step(unwrapped, completed, optimizer)
            last_loss = sum(step_losses) / len(step_losses)
            step_losses = []
            record = {"step": completed, "loss": last_loss, "lr": learning_rate, **hook_metrics}
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if completed % args.logging_steps == 0:
                accelerator.log(record, step=completed)
                if not interactive:
                    accelerator.print(f"{task.name}: step {completed}/{total_steps}, loss {last_loss:.4f}")
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{learning_rate:.2e}")
            if args.eval_steps and completed % args.eval_steps == 0:
                scores = _evaluate(task, model, validation_loader, accelerator, "validation")
                watch.update(completed, scores, unwrapped)
                model.train()
                if accelerator.is_main_process:
                    with log_path.open("a") as handle:
                        handle.write(json.dumps({"step": completed, **_prefixed("validation", scores)}) + "\n")
                accelerator.print(f"{task.name}: step {completed}, validation " + _format(scores))
            if args.checkpointing_steps and completed % args.checkpointing_steps == 0:
                accelerator.save_state(str(output_dir / CHECKPOINTS / f"step_{completed}"))
            if watch.stop or completed >= total_steps or _stop_for_time(accelerator, start, args.max_train_seconds):
                break
        epoch, skip = epoch + 1, 0
    train_seconds = time.perf_counter() - start
    progress.close()

    if args.eval_steps and watch.last_step != completed:  # the last steps were not validated yet
        watch.update(completed, _evaluate(task, model, validation_loader, accelerator, "validation"), unwrapped)
    watch.restore_best(unwrapped)
    if task.eval_split == "validation" and watch.best_scores is not None:
        final_scores = watch.best_scores  # the restored weights were scored on this very split already
    else:
        final_scores = _evaluate(task, model, eval_loader, accelerator, task.eval_split)
    metrics = _prefixed(task.eval_split, final_scores)
    results = {
        "task": task.name,
        "compression": arguments.preset.name,
        "eval_split": task.eval_split,
        "metrics": metrics,
        "parameters": {"total": summary.total_after, "dense": summary.total_before, "ratio": summary.ratio},
        "steps": completed,
        "processes": accelerator.num_processes,
        "train_loss": last_loss,
        "train_seconds": train_seconds,
        **watch.summary(),
        **_kpd_summary(unwrapped),
        "arguments": _scalars(arguments.to_flat_dict()),
    }
    accelerator.wait_for_everyone()
    # FSDP: every process takes part in gathering the full state dict; the main process saves it
    full_state = accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    if accelerator.is_main_process:
        save_outputs(unwrapped, task, arguments, results, full_state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"{task.name}: " + _format(metrics))
    accelerator.print(f"results in {output_dir / RESULTS}")
    return results


class EarlyStopping:
    """Tracks the validation score (the first metric ``evaluate`` returns; higher is better), keeps a copy of the
    best weights, and says stop after ``patience`` evaluations without improvement (0: never)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.stale, self.stop = patience, 0, False
        self.best_score, self.best_step, self.last_step = -math.inf, None, None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_scores: dict[str, float] | None = None
        self.evaluations = 0

    def update(self, step: int, scores: dict[str, float], model: nn.Module) -> None:
        score = next(iter(scores.values()))
        self.evaluations, self.last_step = self.evaluations + 1, step
        if score > self.best_score:
            self.best_score, self.best_step, self.best_scores, self.stale = score, step, dict(scores), 0
            self.best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            return
        self.stale += 1
        self.stop = bool(self.patience) and self.stale >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None and self.best_step != self.last_step:
            model.load_state_dict(self.best_state)

    def summary(self) -> dict[str, Any]:
        if self.best_step is None:
            return {}
        return {
            "best_step": self.best_step,
            "validation": self.best_scores,
            "validation_evaluations": self.evaluations,
            "stopped_early": self.stop,
        }


def _kpd_summary(model: nn.Module) -> dict[str, Any]:
    """KPD models: the share of switched-off blocks (zeros of ``S``, Zhu et al., eq. 4) over all KPD layers and the
    non-zero weight entries their block-sparse inference layers keep, beside the dense entries; else nothing."""
    factorizations = kt.kpd.kpd_factorizations(model)
    if not factorizations:
        return {}
    blocks = sum(f.s.numel() for f in factorizations.values())
    zero_blocks = sum(int((f.s.detach() == 0).sum()) for f in factorizations.values())
    return {
        "kpd": {
            "block_sparsity": zero_blocks / blocks,
            "inference_nonzeros": sum(layer.inference_nonzeros for layer in kt.kpd.layer_report(model)),
            "dense_entries": sum(f.rows * f.cols for f in factorizations.values()),
        }
    }


def _evaluate(task: Task, model: nn.Module, loader: DataLoader, accelerator: Accelerator, split: str) -> dict:
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, loader, accelerator, split)


def _prefixed(split: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{split}_{name}": value for name, value in scores.items()}


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in scores.items())


def _leave_out_tied_copies(accelerator: Accelerator) -> Callable[[list, list, str], None]:
    """A ``save_state`` pre-hook: drop the state-dict keys a model declares tied (transformers'
    ``all_tied_weights_keys``; compressed models also list their tied factor copies in ``_keys_to_ignore_on_save``),
    as ``save_pretrained`` does. ``load_state`` re-ties them (safetensors' ``load_model`` accepts missing aliases),
    and safetensors has no shared tensors left to remove with a warning."""

    def hook(models: list, weights: list, output_dir: str) -> None:
        for model, state in zip(models, weights):
            unwrapped = accelerator.unwrap_model(model)
            tied = set(getattr(unwrapped, "all_tied_weights_keys", None) or ())
            tied |= set(getattr(unwrapped, "_keys_to_ignore_on_save", None) or ())
            prefix = "module." if any(key.startswith("module.") for key in state) else ""
            for key in [key for key in state if key.removeprefix(prefix) in tied]:
                del state[key]

    return hook


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


def _dense_card(task: Task, arguments: RecipeArguments, metrics: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    base = arguments.model.model_name_or_path or arguments.model.model_config or "a config"
    return (
        f"---\nlibrary_name: transformers\ntags:\n- {task.name}\n---\n\n"
        f"# {type(task.model).__name__} ({task.name})\n\n"
        f"Trained with the kron_transformers `{task.name}` recipe from {base}, without compression.\n\n"
        f"## Evaluation\n\n| metric | value |\n| --- | ---: |\n{rows}\n"
    )


def save_outputs(
    model: nn.Module,
    task: Task,
    arguments: RecipeArguments,
    results: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The model (safetensors), tokenizer / image processor, results.json and the model card; then the Hub."""
    args = arguments.train
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict)
    task.save_preprocessing(str(output_dir))
    (output_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    base_model = arguments.model.model_name_or_path
    if kt.applied_config(model) is not None:
        kt.write_model_card(
            model,
            output_dir,
            repo_id=args.push_to_hub,
            base_model=base_model,
            metrics=results["metrics"],
            tags=[task.name],
        )
    else:
        (output_dir / "README.md").write_text(_dense_card(task, arguments, results["metrics"]), encoding="utf-8")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(args.push_to_hub, private=args.hub_private, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            ignore_patterns=[f"{CHECKPOINTS}/*", TRAIN_LOG],
            commit_message=f"{task.name} recipe: " + ", ".join(f"{k} {v:.2f}" for k, v in results["metrics"].items()),
        )
