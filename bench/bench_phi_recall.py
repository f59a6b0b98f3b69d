"""PHI de-identification: recall per identifier kind, false-positive rate and scrub throughput.

    .venv/bin/python bench/bench_phi_recall.py            # the scrubber (Presidio + our recognisers)
    .venv/bin/python bench/bench_phi_recall.py --checker  # the independent no_phi_left detector, on raw text
    .venv/bin/python bench/bench_phi_recall.py --holdout  # sentences written after tuning, never tuned on

Reads pixtrain_dagster/core/phi_eval/eval_set.jsonl. Prints numbers; asserts nothing (tests/test_phi.py gates).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixtrain_dagster.core import phi, phi_check  # noqa: E402
from pixtrain_dagster.core.phi_eval import EVAL_SET, HOLDOUT_SET, NAME_KINDS, load_eval_set, score  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checker", action="store_true", help="measure the independent checker instead")
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="the holdout set (written after tuning, never tuned on) instead of the main set",
    )
    parser.add_argument("--show-misses", action="store_true", help="eval-set line numbers of misses (no text)")
    args = parser.parse_args()
    rows = load_eval_set(HOLDOUT_SET if args.holdout else EVAL_SET)
    if args.checker:
        detect = lambda text: [(s, e) for _, s, e in phi_check.find_residual_phi(text)]  # noqa: E731
    else:
        phi.scrub_text("warm-up: load the engine and the name lists")
        detect = lambda text: [(f.start, f.end) for f in phi.detect(text)]  # noqa: E731
    result = score(detect, rows)
    print(
        f"{'checker' if args.checker else 'scrubber'} on {len(rows)} sentences "
        f"({len(rows) - result.clean_sentences} with identifiers, {result.clean_sentences} clean)"
    )
    print(f"{'kind':<16}{'found':>6}{'total':>6}{'recall':>8}  target")
    for kind in sorted(result.total):
        target = 0.90 if kind in NAME_KINDS else 0.98
        flag = "" if args.checker or result.recall(kind) >= target else "  BELOW TARGET"
        print(f"{kind:<16}{result.found[kind]:>6}{result.total[kind]:>6}{result.recall(kind):>8.3f}  >= {target}{flag}")
    print(
        f"false positives: {result.false_positive_sentences}/{result.clean_sentences} clean sentences "
        f"= {result.false_positive_rate:.3f} (target <= 0.03)"
    )
    if args.show_misses:
        print("misses (kind, eval-set line):", result.misses)
        print("false-positive lines:", result.false_positive_lines)
    if not args.checker:
        texts = [
            m["content"]
            for line in SAMPLE.read_text().splitlines()
            if line.strip()
            for m in json.loads(line)["messages"]
        ]
        started = time.perf_counter()
        for text in texts:
            phi.scrub_text(text)
        elapsed = time.perf_counter() - started
        chars = sum(map(len, texts))
        print(
            f"throughput: {len(texts)} sample-data messages ({chars} chars) in {elapsed:.2f} s = "
            f"{len(texts) / elapsed:.0f} messages/s, {chars / elapsed / 1000:.0f} kchars/s"
        )


if __name__ == "__main__":
    main()
