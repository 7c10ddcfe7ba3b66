"""T5 ``generate`` and inference forward of compressed models against the dense model, in one process.

A T5-small-sized model is built from a config (random weights, nothing downloaded) and compressed four
ways: Shapeshifter r16 on attention and feed-forward, KPD r4 with 4x4 blocks on the feed-forward,
word2ketXS order 2 rank 10 on the (tied) embedding, TT-Rec on the (tied) embedding. Each is run with
the inference cache on (``kt.prepare_for_inference(model, cache="auto")``) and off (``cache="none"``).

Each round runs, in a rotating order, one greedy ``generate`` of exactly ``--new-tokens`` tokens and
one encoder-decoder forward (``--batch x --seq`` tokens, ``no_grad``) of the dense model and of every
variant; the reported ratio is the median over rounds of (variant time / dense time in the same round),
so load changes on a shared machine cancel out.

Run from the repository root::

    python benchmarks/generation.py                          # T5-small size, 8 x 128 tokens, 20 new tokens
    python benchmarks/generation.py --layers 2 --batch 2 --seq 32 --rounds 3 --threads 1   # about a minute
    python benchmarks/generation.py --threads 1 --clock cpu    # on a loaded machine: CPU time, not wall time
    python benchmarks/generation.py --device cuda --dtype bfloat16   # on a GPU (times bracketed by synchronize)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from kernel_speed import synchronize
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.utils import logging as hf_logging

import kron_transformers as kt


# ``--clock cpu``: the process's CPU time, which other processes' load does not inflate (with one thread it
# is the uncontended run time); ``wall`` (default): elapsed time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = ["wall"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS: dict[str, Callable[[], kt.KronConfig]] = {
    "Shapeshifter r16 attention+ffn": lambda: kt.KronConfig(
        attention=kt.Shapeshifter(rank=16), ffn=kt.Shapeshifter(rank=16), init="random"
    ),
    "KPD r4 4x4 ffn": lambda: kt.KronConfig(ffn=kt.KPD(rank=4, block_size=[4, 4]), init="random"),
    "word2ketXS o2 r10 embedding (tied)": lambda: kt.KronConfig(
        embedding=kt.Word2KetXS(order=2, rank=10), init="random"
    ),
    "TensorTrain embedding (tied)": lambda: kt.KronConfig(embedding=kt.TensorTrain(), init="random"),
}
CACHE_MODES = ("auto", "none")


def build_t5(layers: int, seed: int = 0) -> torch.nn.Module:
    """T5-small's shapes (d_model 512, d_ff 2048, 8 heads, vocab 32128, tied head) with ``layers`` blocks each side."""
    config = AutoConfig.for_model(
        "t5",
        d_model=512,
        d_ff=2048,
        d_kv=64,
        num_heads=8,
        num_layers=layers,
        vocab_size=32128,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``run``; on CUDA the queued kernels are waited for before and after."""
    synchronize(device)
    start = CLOCKS[CLOCK[0]]()
    with torch.no_grad():
        run()
    synchronize(device)
    return CLOCKS[CLOCK[0]]() - start


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder blocks (T5-small: 6)")
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="input tokens per sequence (default 128)")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens generated (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round (default 5)")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="wall time or process CPU time (use with --threads 1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype (default float32)")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (substring match)")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    CLOCK[0] = arguments.clock
    hf_logging.set_verbosity_error()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    device, dtype = torch.device(arguments.device), DTYPES[arguments.dtype]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 32128, (arguments.batch, arguments.seq), generator=generator).to(device)
    decoder_ids = torch.randint(2, 32128, (arguments.batch, arguments.new_tokens), generator=generator).to(device)
    models: dict[str, torch.nn.Module] = {"dense": build_t5(arguments.layers).to(device, dtype)}
    for name, make_config in VARIANTS.items():
        if arguments.variants and not any(part in name for part in arguments.variants):
            continue
        for cache in CACHE_MODES:
            model = kt.compress_model(build_t5(arguments.layers), make_config()).to(device, dtype)
            kt.prepare_for_inference(model, cache=cache)
            models[f"{name} | cache={cache}"] = model

    def generate(model):
        return lambda: model.generate(
            input_ids=input_ids,
            max_new_tokens=arguments.new_tokens,
            min_new_tokens=arguments.new_tokens,
            do_sample=False,
            num_beams=1,
        )

    def forward(model):
        return lambda: model(input_ids=input_ids, decoder_input_ids=decoder_ids)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__} | {device_name} {arguments.dtype} | threads {torch.get_num_threads()} | "
        f"T5-small, {arguments.layers} layers | "
        f"{arguments.batch}x{arguments.seq} input tokens, {arguments.new_tokens} new tokens | "
        f"{arguments.rounds} rounds after 1 warm-up | cost model {kt.factorizations.cost.cost_model()} | "
        f"clock {arguments.clock}"
    )
    names = list(models)
    ratios: dict[str, dict[str, list[float]]] = {name: {"generate": [], "forward": []} for name in names}
    seconds: dict[str, dict[str, list[float]]] = {name: {"generate": [], "forward": []} for name in names}
    started = time.perf_counter()
    for round_index in range(arguments.rounds + 1):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        times = {
            name: {
                "generate": timed(generate(models[name]), device),
                "forward": timed(forward(models[name]), device),
            }
            for name in order
        }
        if round_index == 0:
            continue  # warm-up: caches filled, cost-model decisions measured
        for name in names:
            for kind in ("generate", "forward"):
                seconds[name][kind].append(times[name][kind])
                ratios[name][kind].append(times[name][kind] / times["dense"][kind])
    width = max(len(name) for name in names)
    print(f"\n{'model'.ljust(width)}  generate s  generate/dense  forward s  forward/dense")
    for name in names:
        generate_s = statistics.median(seconds[name]["generate"])
        forward_s = statistics.median(seconds[name]["forward"])
        print(
            f"{name.ljust(width)}  {generate_s:10.3f}  {statistics.median(ratios[name]['generate']):13.2f}x"
            f"  {forward_s:9.3f}  {statistics.median(ratios[name]['forward']):12.2f}x"
        )
    print(f"\ntotal {time.perf_counter() - started:.1f} s (ratios: median over rounds of variant / dense, same round)")


if __name__ == "__main__":
    main()
