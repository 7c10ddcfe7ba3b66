"""Image classification (ViT by default; any ``AutoModelForImageClassification``): processor, augmentation, task.

The image processor of a model built from a config is constructed from that config (``image_size``, ViT's
mean/std of 0.5), so nothing is downloaded; a pretrained model brings its own. Training augmentation is the usual
CIFAR one: a random crop of the image padded by 1/8 of its size (reflection) and a random horizontal flip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.utils import is_torchvision_available

from .arguments import RecipeArguments
from .data import ImageSplit, load_images
from .loop import Task
from .metrics import accuracy
from .modeling import build_config
from .presets import apply_compression


def build_image_processor(arguments: RecipeArguments, image_size: int):
    if arguments.model.model_name_or_path:
        return AutoImageProcessor.from_pretrained(arguments.model.model_name_or_path)
    if is_torchvision_available():
        from transformers import ViTImageProcessor as processor_class
    else:
        from transformers import ViTImageProcessorPil as processor_class
    return processor_class(size={"height": image_size, "width": image_size}, image_mean=0.5, image_std=0.5)


def augment(images: np.ndarray) -> np.ndarray:
    """Random crop of the reflection-padded images (padding = size / 8) and random horizontal flip, per image.

    Draws from torch's global generator, so a resumed run (whose random state ``load_state`` restores) repeats it.
    """
    count, height, width, _ = images.shape
    pad = max(1, min(height, width) // 8)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (count, 2)).tolist()
    flips = (torch.rand(count) < 0.5).tolist()
    out = np.empty_like(images)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
        crop = padded[i, dy : dy + height, dx : dx + width]
        out[i] = crop[:, ::-1] if flip else crop
    return out


def build_image_model(
    arguments: RecipeArguments, classes: list[str], default_config: dict[str, Any]
) -> torch.nn.Module:
    labels = dict(
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
    )
    config = build_config(arguments.model, default_config, **labels)
    if arguments.model.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            arguments.model.model_name_or_path, config=config, ignore_mismatched_sizes=True
        )
    else:
        model = AutoModelForImageClassification.from_config(config)
    return apply_compression(model, arguments.preset, arguments.model.init, arguments.model.untie_lm_head)


def image_task(arguments: RecipeArguments, builtin: Callable[[], dict], default_config: dict[str, Any]) -> Task:
    """Data, image processor, model, loss and top-1 accuracy of the image-classification recipe."""
    train_args = arguments.train
    splits = load_images(arguments.data, builtin, train_args.seed)
    train = splits["train"]
    model = build_image_model(arguments, train.classes, {**default_config, "image_size": train.images.shape[1]})
    image_size = getattr(model.config, "image_size", train.images.shape[1])
    processor = build_image_processor(arguments, image_size)
    eval_split = "test" if "test" in splits else "validation"

    def collate_for(split: ImageSplit, training: bool) -> Callable[[list[int]], dict[str, torch.Tensor]]:
        def collate(indices: list[int]) -> dict[str, torch.Tensor]:
            images = split.images[indices]
            if training and train_args.augment:
                images = augment(images)
            pixels = processor(list(images), return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": torch.from_numpy(split.labels[indices])}

        return collate

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=train_args.label_smoothing)

    def evaluate(model: torch.nn.Module, batches: Iterable, accelerator: Accelerator, split: str) -> dict[str, float]:
        predictions, labels = [], []
        for batch in batches:
            predicted = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
            predicted, label = accelerator.gather_for_metrics((predicted, batch["labels"]))
            predictions += predicted.tolist()
            labels += label.tolist()
        return accuracy(predictions, labels)

    return Task(
        name="image-classification",
        model=model,
        train_data=list(range(len(train))),
        eval_data=list(range(len(splits[eval_split]))),
        eval_split=eval_split,
        collate_train=collate_for(train, True),
        collate_eval=collate_for(splits[eval_split], False),
        validation_data=list(range(len(splits["validation"]))),
        collate_validation=collate_for(splits["validation"], False),
        loss=loss,
        evaluate=evaluate,
        save_preprocessing=processor.save_pretrained,
    )
