"""Packed-row attention: plain `sdpa` (transformers' 4-D block-diagonal mask) vs `segmented_sdpa` (core/attention.py).

    .venv/bin/python bench/bench_attention.py [--row-lengths 512 2048] [--tokens 4096] [--steps 5]
        [--sessions N] [--snapshot DIR] [--device cpu|cuda] [--json OUT.json]
    .venv/bin/python bench/bench_attention.py --smoke      # tiny Llama: checks the path runs

One forward and backward of the training loss (`summed_token_loss`: LoRA r 8 on q/k/v/o, dropout 0.05) on the same
packed batches (``--tokens`` positions: ``tokens / row length`` rows), for each attention implementation in turn,
alternating which goes first, on the same base weights. Reported: median real tokens/s over ``--steps`` batches after
one warm-up batch each, and the ratio. Prints; never asserts a speed. The CPU figures decided ``auto`` (segmented_sdpa
on CPU); on a GPU ``auto`` stays sdpa until this (``--device cuda``) or bench_gpu.py ``--attn`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    as_sessions,
    load_bench_conversations,
    print_table,
    smollm2_snapshot,
    tiny_snapshot,
    write_json,
)

IMPLEMENTATIONS = ("sdpa", "segmented_sdpa")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row-lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="positions per batch (rows = tokens // row length)")
    parser.add_argument("--steps", type=int, default=5, help="measured batches per implementation and row length")
    parser.add_argument("--sessions", type=int, metavar="N", help="sessions of 1 to N exchanges (see the peer bench)")
    parser.add_argument("--snapshot", type=Path, help="model folder (default: SmolLM2-135M from the wheel)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny Llama, 1 batch: only checks that the path runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.row_lengths, args.tokens, args.steps = [128, 256], 512, 1
    return args


def _models(snapshot: Path, device: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from pixtrain_dagster.core.models import load_snapshot

    models = {}
    for name in IMPLEMENTATIONS:
        torch.manual_seed(0)
        model, _ = load_snapshot(snapshot, device, for_training=True, attn_implementation=name)
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        models[name] = get_peft_model(model, lora)
    return models


def measure(args, snapshot: Path) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.loss import summed_token_loss
    from pixtrain_dagster.core.tokenization import StepIndexedBatches, pack_rows, tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    import torch

    models = _models(snapshot, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    conversations = load_bench_conversations(None, 400, args.seed)
    if args.sessions:
        conversations = as_sessions(conversations, args.sessions, args.seed)
    results = []
    for row_length in args.row_lengths:
        tokenized = tokenize_conversations(tokenizer, conversations, row_length)
        rows = pack_rows(tokenized.conversations, row_length, pack=True)
        batches = StepIndexedBatches(rows, max(1, args.tokens // row_length), args.seed, tokenizer.pad_token_id)
        rates: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
        for step in range(args.steps + 1):
            batch = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in batches.batch(step).items()}
            order = IMPLEMENTATIONS if step % 2 == 0 else IMPLEMENTATIONS[::-1]
            for name in order:
                sync()
                started = time.perf_counter()
                loss, _ = summed_token_loss(models[name], batch)
                loss.backward()
                sync()
                if step:  # the first batch of each is a warm-up (allocations)
                    rates[name].append(batch["real_tokens"] / (time.perf_counter() - started))
        base = statistics.median(rates["sdpa"])
        for name in IMPLEMENTATIONS:
            rate = statistics.median(rates[name])
            results.append(
                {
                    "row_length": row_length,
                    "rows": batch["input_ids"].shape[0],
                    "attn_implementation": name,
                    "real_tokens_per_second": rate,
                    "vs_sdpa": rate / base,
                }
            )
            print(f"row length {row_length}: {name} {rate:.1f} real tok/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pixtrain-bench-") as tmp:
        snapshot = tiny_snapshot(Path(tmp)) if args.smoke else smollm2_snapshot(args.snapshot, Path(tmp))
        results = measure(args, snapshot)
    print_table(
        results,
        [
            ("row_length", "row length", "d"),
            ("rows", "rows", "d"),
            ("attn_implementation", "attention", "s"),
            ("real_tokens_per_second", "real tok/s", ".1f"),
            ("vs_sdpa", "x sdpa", ".2f"),
        ],
    )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
