"""Image-classification recipe: any ``AutoModelForImageClassification`` (ViT by default), compressed.

```bash
python recipes/image_classification.py             # offline default: small ViT from a config, built-in images
python recipes/image_classification.py --compression vit_tiny_kpd_cifar100 \\
    --dataset_name uoft-cs/cifar100                   # Zhu et al., Table 3 (ViT-tiny, KPD rank 4, 4x4 blocks)
python recipes/image_classification.py --train_file images/train --validation_file images/val   # image folders
```

Data: ``--dataset_name`` (image column ``img``/``image``, label column ``label``/``fine_label`` unless given), an
image folder (one subfolder per class) or a .npz with ``images`` (N, H, W, 3) uint8 and ``labels``. Training
augmentation: random crop + horizontal flip (``--augment false`` turns it off). Metric: top-1 accuracy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from recipe_kit import builtin
from recipe_kit.arguments import TEXT_ONLY, parse_arguments
from recipe_kit.errors import run_main
from recipe_kit.images import image_task
from recipe_kit.loop import make_accelerator, train


SMALL_VIT = dict(
    model_type="vit", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=4
)
DEFAULTS = dict(
    output_dir="outputs/image-classification",
    compression="small_kpd",
    learning_rate=2e-3,
    warmup_steps=50,
    max_steps=200,
    per_device_train_batch_size=32,
    weight_decay=0.05,
    lr_scheduler="linear",
    checkpointing_steps=100,
)


def main(argv: Sequence[str] | None = None) -> dict:
    arguments = parse_arguments(DEFAULTS, argv, unused=TEXT_ONLY)
    accelerator = make_accelerator(arguments.train)
    return train(image_task(arguments, builtin.images, SMALL_VIT), arguments, accelerator)


if __name__ == "__main__":
    sys.exit(run_main(main))
