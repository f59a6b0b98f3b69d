"""Peak memory of reading a large landing file: streamed JSONL reading stays bounded by the line limit.

    .venv/bin/python bench/bench_landing_memory.py [--gb 1.0] [--keep]

Writes a ~1 GB chat JSONL file (sample conversations repeated) to a temporary folder, then, in a fresh child
process each, (a) streams it with iter_jsonl, validating every record as raw_conversations does, and (b) for
contrast reads it whole with read_jsonl (the list form) on a tenth of it. Prints peak RSS (ru_maxrss) and time.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"

CHILD = r"""
import resource, sys, time
sys.path.insert(0, {root!r})
from pixtrain_dagster.core.conversations import iter_jsonl, read_jsonl, validation_problem
mode, path = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if mode == "stream":
    n = sum(1 for r in iter_jsonl(path) if validation_problem(r.messages, 4000) is None or True)
else:
    n = len(read_jsonl(path))
print(n, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - started)
"""


def make_file(path: Path, target_bytes: int) -> int:
    lines = [line.strip() + "\n" for line in SAMPLE.read_text().splitlines() if line.strip()]
    block = "".join(lines).encode()
    written = 0
    with open(path, "wb") as handle:
        while written < target_bytes:
            handle.write(block)
            written += len(block)
    return written


def run(mode: str, path: Path) -> tuple[int, float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    n, base, peak, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    return n, base / 1024, peak / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pixtrain-bench-landing-"))
    try:
        big = folder / "landing.jsonl"
        size = make_file(big, int(args.gb * 1024**3))
        n, base, peak, seconds = run("stream", big)
        print(
            f"streamed {size / 1024**3:.2f} GiB, {n} records in {seconds:.0f} s "
            f"({size / seconds / 1024**2:.0f} MiB/s): "
            f"peak RSS {peak:.0f} MiB (interpreter + imports alone: {base:.0f} MiB)"
        )
        small = folder / "tenth.jsonl"
        size_small = make_file(small, int(args.gb * 1024**3 / 10))
        n, base, peak, seconds = run("list", small)
        print(
            f"for contrast, read whole into a list: {size_small / 1024**3:.2f} GiB, {n} records: "
            f"peak RSS {peak:.0f} MiB"
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
