"""Demo of the main job: compress a model built from a config, report, train a step, decompress.

Run with ``python -m kron_transformers.demo``; no downloads, a few seconds on a laptop CPU.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.utils import logging as hf_logging

import kron_transformers as kt


def main() -> None:
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "t5", d_model=64, d_ff=256, num_layers=2, num_heads=4, d_kv=16, vocab_size=1000, decoder_start_token_id=0
    )
    model = AutoModelForSeq2SeqLM.from_config(config)
    input_ids = torch.randint(1, 1000, (4, 16))
    labels = torch.randint(1, 1000, (4, 8))

    compression = kt.KronConfig(
        embedding=kt.Word2KetXS(order=2, rank=8),
        attention=kt.Shapeshifter(rank=4),
        ffn=kt.KPD(rank=2, block_size=(4, 4)),
        init="svd",
    )
    model = kt.compress_model(model, compression)
    print(kt.report(model))

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(3):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"training step {step}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        compressed_logits = model(input_ids=input_ids, labels=labels).logits
        dense = kt.decompress_model(model)
        dense_logits = dense(input_ids=input_ids, labels=labels).logits
    difference = (compressed_logits - dense_logits).abs().max().item()
    print(f"decompress_model: plain nn.Linear / nn.Embedding again, max logit difference {difference:.2e}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
