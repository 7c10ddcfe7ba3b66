"""``kron-transformers``: compress, inspect, decompress and document checkpoints from the shell.

```
kron-transformers compress t5-small --config cfg.yaml --output t5-small-kron [--push-to-hub me/t5-small-kron]
kron-transformers compress DIR --config cfg.yaml --output OUT --calibration-data sentences.txt  # init: calibrated
kron-transformers compress DIR --config cfg.yaml --output OUT --calibration-data s.txt --layer-by-layer  # big models
kron-transformers report t5-small-kron
kron-transformers decompress t5-small-kron --output t5-small-dense
kron-transformers card t5-small-kron --metrics results.json
```
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # the CLI imports torch, transformers and the package's modules only inside a command
    from .config import KronConfig

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # name or org/name


def _progress(message: str) -> None:
    print(f"[kron-transformers] {message}", file=sys.stderr, flush=True)


def _existing_model(location: str) -> str:
    """``location`` itself when it is an existing folder or could be a Hub repo id; else a clear ValueError."""
    if Path(location).expanduser().exists() or (HUB_REPO_ID.match(location) and ".." not in location):
        return location
    raise ValueError(f"{location} does not exist (neither a local folder nor a Hub repo id 'name' or 'org/name')")


def _read_config(path: str) -> KronConfig:
    import yaml

    from .config import KronConfig

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = file.read_text("utf-8")
    try:
        data = yaml.safe_load(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"config file {path} is not valid {file.suffix.lstrip('.') or 'JSON'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of KronConfig fields, got {type(data).__name__}")
    return KronConfig.from_dict(data)


def _read_metrics(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read metrics from {path}: {error}") from None


def compress(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from . import compress_model, compress_pretrained, push_to_hub, report, write_model_card
    from .calibration_data import calibration_batches, load_preprocessor, read_calibration_inputs
    from .integration.checkpoint import model_class_for

    _existing_model(args.model)
    config = _read_config(args.config)
    model_class = model_class_for(AutoConfig.from_pretrained(args.model), args.model_class)
    preprocessor = load_preprocessor(args.model)
    batches = None
    if args.calibration_data:
        inputs = read_calibration_inputs(args.calibration_data, args.text_column, args.calibration_samples)
        batches = calibration_batches(preprocessor, inputs, args.calibration_batch_size)
        _progress(f"calibration data: {len(inputs)} inputs from {args.calibration_data}")
    elif config.init == "calibrated":
        raise ValueError("init='calibrated' needs --calibration-data FILE (text lines, .jsonl or an image folder)")
    if args.layer_by_layer and (config.init != "calibrated" or batches is None):
        raise ValueError(
            "--layer-by-layer calibrates one block at a time: it needs init: calibrated in the config and "
            f"--calibration-data (the config has init={config.init!r}; svd and random already compress while loading)"
        )
    start = time.perf_counter()
    if args.layer_by_layer:  # block by block from the shards, each block calibrated on the compressed ones before it
        _progress(f"compressing {args.model} block by block (init=calibrated, {model_class.__name__})")
        model = compress_pretrained(args.model, config, batches, model_class=model_class)
    elif batches is not None:  # calibration runs the dense model on data: load it whole first
        _progress(f"loading {args.model} as {model_class.__name__}")
        model = model_class.from_pretrained(args.model)
        _progress(f"compressing (init={config.init})")
        compress_model(model, config, calibration_data=batches)
    else:  # each targeted weight is factorized as it is read (integration/streaming.py)
        _progress(f"loading {args.model} as {model_class.__name__}, compressing while loading (init={config.init})")
        model = model_class.from_pretrained(args.model, quantization_config=config)
    _progress(f"compressed in {time.perf_counter() - start:.1f} s")
    print(report(model))
    base_model = args.base_model  # None: the card derives it from the loaded model's name when it is a Hub id
    _progress(f"saving to {args.output}")
    model.save_pretrained(args.output)
    if preprocessor is not None:
        preprocessor.save_pretrained(args.output)
    write_model_card(model, args.output, repo_id=args.push_to_hub, base_model=base_model)
    if args.push_to_hub:
        _progress(f"pushing to {args.push_to_hub}")
        push_to_hub(model, args.push_to_hub, base_model=base_model)


def show_report(args: argparse.Namespace) -> None:
    from . import report
    from .integration.checkpoint import load_structure

    print(report(load_structure(_existing_model(args.checkpoint), args.model_class)))


def decompress(args: argparse.Namespace) -> None:
    from . import decompress_model, from_pretrained

    _progress(f"loading {_existing_model(args.checkpoint)}")
    model = from_pretrained(args.checkpoint)
    _progress("materializing dense weights")
    decompress_model(model)
    _progress(f"saving the dense model to {args.output}")
    model.save_pretrained(args.output)


def card(args: argparse.Namespace) -> None:
    from . import write_model_card
    from .integration.checkpoint import load_structure

    model = load_structure(args.checkpoint, args.model_class)
    path = write_model_card(model, args.checkpoint, args.repo_id, args.base_model, _read_metrics(args.metrics))
    _progress(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kron-transformers", description="Compress Hugging Face models with Kronecker-factorized layers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("compress", help="compress a model and save it (optionally push it)")
    command.add_argument("model", help="Hub id or local folder of the dense (or any) transformers checkpoint")
    command.add_argument("--config", required=True, help="KronConfig as a .json or .yaml file (KronConfig.to_dict())")
    command.add_argument("--output", required=True, help="folder to write the compressed checkpoint and card to")
    command.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo, e.g. me/t5-small-kron")
    command.add_argument(
        "--model-class", help="transformers class, e.g. AutoModelForSeq2SeqLM (default: config.architectures[0])"
    )
    command.add_argument("--base-model", help="base_model for the card (default: MODEL when it is a Hub id)")
    command.add_argument(
        "--calibration-data",
        metavar="FILE",
        help="inputs for init='calibrated': a text file (one input a line, .gz ok), a .jsonl, or an image folder",
    )
    command.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="with init: calibrated, read, calibrate and compress one block at a time from the safetensors shards, "
        "each block calibrated on the compressed blocks before it (kt.compress_pretrained): peak memory about the "
        "compressed model plus one dense block, for models larger than memory",
    )
    command.add_argument("--text-column", default="text", help="the text field of --calibration-data .jsonl records")
    command.add_argument("--calibration-samples", type=int, default=512, help="use at most this many inputs")
    command.add_argument("--calibration-batch-size", type=int, default=16, help="inputs per calibration batch")
    command.set_defaults(run=compress)

    command = commands.add_parser("report", help="print the parameter table of a compressed checkpoint")
    command.add_argument("checkpoint", help="local folder or Hub id of a compressed checkpoint")
    command.add_argument("--model-class", help="transformers class (default: config.architectures[0])")
    command.set_defaults(run=show_report)

    command = commands.add_parser("decompress", help="write a plain dense checkpoint (loads without the plugin)")
    command.add_argument("checkpoint", help="local folder or Hub id of a compressed checkpoint")
    command.add_argument("--output", required=True, help="folder for the dense checkpoint")
    command.set_defaults(run=decompress)

    command = commands.add_parser("card", help="write or refresh README.md (the model card) of a checkpoint folder")
    command.add_argument("checkpoint", help="local folder of a compressed checkpoint")
    command.add_argument("--repo-id", help="Hub repo id shown in the card's loading example")
    command.add_argument("--base-model", help="base_model in the card's metadata")
    command.add_argument("--metrics", help="JSON file of evaluation results to list in the card")
    command.add_argument("--model-class", help="transformers class (default: config.architectures[0])")
    command.set_defaults(run=card)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"kron-transformers {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
