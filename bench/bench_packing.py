"""Packing and batch picking at scale: prints seconds for 10k, 100k and 1M conversations (first-fit-decreasing on a
segment tree, O(n log n)) and the cost of picking a batch, which must not grow with the dataset.

    .venv/bin/python bench/bench_packing.py [--sizes 10000 100000 1000000] [--max-seq-len 2048]
"""

from __future__ import annotations

import argparse
import random
import time

from pixtrain_dagster.core.tokenization import IGNORE_INDEX, StepIndexedBatches, TokenizedConversation, pack_rows


def synthetic(count: int, max_seq_len: int, seed: int = 0) -> list[TokenizedConversation]:
    """Conversation lengths like chat data: mostly short, a long tail up to the row length."""
    rng = random.Random(seed)
    lengths = [min(max_seq_len, max(8, int(rng.lognormvariate(5.0, 0.8)))) for _ in range(count)]
    return [TokenizedConversation([1] * n, [IGNORE_INDEX] * (n // 2) + [1] * (n - n // 2)) for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    print(f"{'conversations':>13} {'rows':>9} {'fill':>6} {'pack s':>8} {'us/conv':>8} {'batch ms':>9}")
    for size in args.sizes:
        conversations = synthetic(size, args.max_seq_len)
        started = time.perf_counter()
        rows = pack_rows(conversations, args.max_seq_len, pack=True)
        seconds = time.perf_counter() - started
        fill = sum(r.length for r in rows) / (len(rows) * args.max_seq_len)
        batches = StepIndexedBatches(rows, args.micro_batch_size, seed=1, pad_token_id=0, accumulation=4)
        batches.batch(0)  # the pass's shuffle, once
        started = time.perf_counter()
        for step in range(1, 51):
            batches.batch(step)
        batch_ms = (time.perf_counter() - started) / 50 * 1000
        print(f"{size:>13,} {len(rows):>9,} {fill:>6.3f} {seconds:>8.2f} {seconds / size * 1e6:>8.2f} {batch_ms:>9.2f}")


if __name__ == "__main__":
    main()
