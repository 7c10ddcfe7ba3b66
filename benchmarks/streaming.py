"""Compress-while-loading memory: peak resident memory against the dense and the compressed size.

Writes a Llama-style dense checkpoint (random bf16 weights, sharded safetensors; nothing is
downloaded) into a temporary folder, then loads it in a fresh child process with
``LlamaForCausalLM.from_pretrained(folder, quantization_config=KronConfig(attention=Shapeshifter,
ffn=Shapeshifter), dtype=bfloat16)`` and reports the child's peak resident set (``VmHWM``) when loading
returns and again after reading every tensor (the uncompressed ones stay memory-mapped until read), the
resident set of the same imports without loading (the interpreter, torch, transformers), the dense
checkpoint size, the largest shard, the compressed model's size and the load time. The goal is
peak RSS <= 1.5 x compressed size + largest dense shard. A small model of the same layout checks
that streaming gives exactly the tensors of load-then-``compress_model``.

    python benchmarks/streaming.py                # about 2B parameters, init="random"
    python benchmarks/streaming.py --init svd     # the SVD init (randomized SVD at these sizes and rank 8)
    python benchmarks/streaming.py --preset 150M  # a smaller model
    python benchmarks/streaming.py --preset 400M --init calibrated  # block by block (kt.compress_pretrained)

``init="random"`` reads each dense tensor only for its standard deviation; ``init="svd"`` factorizes it
(at rank 8 the 2B model's rearranged matrices take ``decompositions.randomized_svd``). ``init="calibrated"``
runs ``kt.compress_pretrained(folder, config, batches)`` instead of ``from_pretrained``: block by block, each
block calibrated on the compressed blocks before it (``integration/layerwise.py``), on ``--calibration-batches``
batches of 2 x ``--calibration-length`` random token ids (random ids exercise the memory and the time, not the
quality). Its goal adds one dense block and the calibration activations of one block to the shard, and its
identity check compares the first block with ``compress_model(calibration_data=...)`` (the later blocks see
compressed inputs by design) with the ALS sweeps fixed (``calibration_time_ratio=None``).
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


PRESETS = {  # name -> (hidden, intermediate, layers, heads, vocab)
    "2B": (2560, 6912, 24, 20, 32000),
    "1B": (2048, 5632, 20, 16, 32000),
    "400M": (1024, 2816, 24, 16, 32000),
    "150M": (768, 2048, 12, 12, 32000),
    "tiny": (64, 160, 2, 4, 256),
}


def llama_config(preset: str):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, vocab = PRESETS[preset]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def write_dense_checkpoint(folder: Path, preset: str, shard_bytes: int, seed: int = 0) -> None:
    """A sharded bf16 checkpoint written one shard at a time (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(preset)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if "norm" in name:
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        tensor = tensor.to(torch.bfloat16)
        if size and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    total = len(shards)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        shard.clear()
    total_size = sum(os.path.getsize(folder / f) for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map})
    )


def kron_config(init: str, rank: int, **options):
    import kron_transformers as kt

    return kt.KronConfig(attention=kt.Shapeshifter(rank=rank), ffn=kt.Shapeshifter(rank=rank), init=init, **options)


def peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


class ResidentSampler:
    """Samples ``RssAnon`` and ``RssFile`` every few milliseconds in a thread; keeps the peak of each."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.interval, self.running = interval, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(line.split()[1]) * 1024)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.thread.join()
        return self.peaks


def calibration_batches(count: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, length), generator=generator)} for _ in range(count)]


def child(folder: str, init: str, rank: int, load: bool, batches: int = 4, length: int = 128) -> None:
    """Runs in a fresh process: load while compressing (or only import), print one JSON line."""
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    import kron_transformers  # noqa: F401 (registers the plugin)

    logging.disable_progress_bar()
    result = {"baseline_rss": peak_rss()}
    if load:
        sampler = ResidentSampler()
        start = time.perf_counter()
        if init == "calibrated":
            import kron_transformers as kt

            vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
            data = calibration_batches(batches, length, vocab)
            model = kt.compress_pretrained(folder, kron_config(init, rank), data, dtype=torch.bfloat16)
        else:
            model = LlamaForCausalLM.from_pretrained(
                folder, quantization_config=kron_config(init, rank), dtype=torch.bfloat16
            )
        result["seconds"] = time.perf_counter() - start
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
        result["compressed_bytes"] = sum(t.nbytes for t in tensors.values())
        result["compressed_parameters"] = sum(p.numel() for p in model.parameters())
        result["peak_rss_loading"] = peak_rss()
        # the tensors loaded as they are (embeddings, head, norms) stay memory-mapped views of the checkpoint
        # files, resident only once read: read every tensor so the peak counts the whole compressed model
        for tensor in tensors.values():
            tensor.sum()
        result["peak_rss"] = peak_rss()
        peaks = sampler.stop()
        result["peak_anonymous"], result["peak_file_backed"] = peaks["RssAnon"], peaks["RssFile"]
    print(json.dumps(result))


def run_child(folder: Path, init: str, rank: int, load: bool, batches: int = 4, length: int = 128) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), "--init", init, "--rank", str(rank)]
    command += ["--calibration-batches", str(batches), "--calibration-length", str(length)]
    if not load:
        command.append("--imports-only")
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def check_identical(init: str, rank: int) -> bool:
    """Streaming equals load-then-compress_model exactly on a tiny model of the same layout."""
    from transformers import LlamaForCausalLM

    import kron_transformers as kt

    with tempfile.TemporaryDirectory() as folder:
        write_dense_checkpoint(Path(folder), "tiny", shard_bytes=40_000)
        if init == "calibrated":
            return check_first_block(folder, rank)
        torch.manual_seed(0)
        streamed = LlamaForCausalLM.from_pretrained(folder, quantization_config=kron_config(init, rank))
        dense = LlamaForCausalLM.from_pretrained(folder)
        torch.manual_seed(0)
        expected = kt.compress_model(dense, kron_config(init, rank)).state_dict()
        state = streamed.state_dict()
        return state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


def check_first_block(folder: str, rank: int) -> bool:
    """Block-by-block calibration's first block equals ``compress_model(calibration_data=...)``'s exactly."""
    from transformers import LlamaForCausalLM

    import kron_transformers as kt

    config = kron_config("calibrated", rank, calibration_time_ratio=None)  # fixed ALS sweeps, no time budget
    data = calibration_batches(2, 16, PRESETS["tiny"][4])
    state = kt.compress_pretrained(folder, config, data).state_dict()
    dense = LlamaForCausalLM.from_pretrained(folder)
    expected = kt.compress_model(dense, config, calibration_data=data).state_dict()
    first = [key for key in expected if key.startswith("model.layers.0.")]
    return bool(first) and all(torch.equal(state[key], expected[key]) for key in first)


def block_bytes(preset: str) -> int:
    """One dense bf16 block's weights (attention, MLP, two norms)."""
    hidden, intermediate, _, _, _ = PRESETS[preset]
    return 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2B")
    parser.add_argument("--init", choices=["random", "svd", "calibrated"], default="random")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="dense shard size in GB")
    parser.add_argument("--calibration-batches", type=int, default=4, help="init=calibrated: batches of 2 sequences")
    parser.add_argument("--calibration-length", type=int, default=128, help="init=calibrated: tokens per sequence")
    parser.add_argument("--folder", help="write the dense checkpoint here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--imports-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(
            args.child, args.init, args.rank, not args.imports_only, args.calibration_batches, args.calibration_length
        )

    torch.set_num_threads(1)
    hidden, intermediate, layers, _, vocab = PRESETS[args.preset]
    parameters = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * vocab * hidden
    needed = 2 * parameters + int(args.shard_gb * 1e9)
    if memory_available() < 2 * needed // 3:
        sys.exit(f"only {memory_available() / 2**30:.1f} GiB available; use a smaller --preset")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        start = time.perf_counter()
        write_dense_checkpoint(folder, args.preset, int(args.shard_gb * 1e9))
        written = time.perf_counter() - start
        shard_sizes = [p.stat().st_size for p in folder.glob("model-*.safetensors")]
        calibration = (args.calibration_batches, args.calibration_length)
        baseline = run_child(folder, args.init, args.rank, False, *calibration)
        result = run_child(folder, args.init, args.rank, True, *calibration)
    identical = check_identical(args.init, args.rank)

    gb = 1e9
    dense, largest, compressed = sum(shard_sizes), max(shard_sizes), result["compressed_bytes"]
    budget = 1.5 * compressed + largest
    goal_extra = " + block + activations" if args.init == "calibrated" else ""
    if args.init == "calibrated":  # one dense block and one block's activations (float32, a few per token)
        tokens = 2 * args.calibration_batches * args.calibration_length
        activations = 4 * tokens * (4 * hidden + 2 * intermediate)
        budget += block_bytes(args.preset) + activations
        print(f"one dense block {block_bytes(args.preset) / 1e9:.3f} GB, activations {activations / 1e9:.3f} GB")
    print(
        f"dense checkpoint: {parameters / 1e9:.2f}B parameters, {len(shard_sizes)} shards, written in {written:.0f} s"
    )
    print()
    print(
        "| preset | init | dense (GB) | largest shard (GB) | compressed (GB) | peak RSS loading (GB) "
        "| peak RSS, every tensor read (GB) | peak anonymous (GB) "
        f"| peak file-backed (GB) | imports only (GB) | goal: 1.5x compressed + shard{goal_extra} (GB) | within goal "
        "| load + compress (s) | identical to load-then-compress |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    print(
        f"| {args.preset} | {args.init} | {dense / gb:.2f} | {largest / gb:.2f} | {compressed / gb:.3f} "
        f"| {result['peak_rss_loading'] / gb:.2f} | {result['peak_rss'] / gb:.2f} "
        f"| {result['peak_anonymous'] / gb:.2f} "
        f"| {result['peak_file_backed'] / gb:.2f} | {baseline['baseline_rss'] / gb:.2f} | {budget / gb:.2f} "
        f"| {'yes' if result['peak_rss'] <= budget else 'no'} "
        f"| {result['seconds']:.0f} | {'yes' if identical else 'NO'} |"
    )
    if args.init == "calibrated":  # what the goal leaves out: the input second moments C of one block's linears
        statistics = 8 * (6 * hidden * hidden + intermediate * intermediate)  # float64: q, k, v, o, gate, up; down
        print(
            f"\none block's calibration statistics (float64 C of its 7 linears): {statistics / gb:.2f} GB; "
            f"peak RSS is {result['peak_rss'] / dense:.0%} of the dense checkpoint"
        )


if __name__ == "__main__":
    main()
