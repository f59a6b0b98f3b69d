"""Small operator commands: ``python -m pixtrain_dagster.cli seed|summary``.

``seed`` copies the packaged sample dataset into the landing location (skipped when chat JSONL is already
there); ``summary`` prints where the latest adapter, checkpoints, reports and promoted adapter are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.artifacts import ArtifactError

SAMPLE_DATASET = Path(__file__).parent / "sample_data" / "conversations.jsonl"


def seed(force: bool = False) -> int:
    from .resources.artifacts import ArtifactStoreResource

    landing = ArtifactStoreResource.from_env().landing_store()
    existing = landing.list_files(suffix=".jsonl")
    if existing and not force:
        print(f"landing location {landing.root} already holds {len(existing)} JSONL file(s); not seeding")
        return 0
    landing.put_file(SAMPLE_DATASET, SAMPLE_DATASET.name)
    print(f"seeded {landing.uri(SAMPLE_DATASET.name)} with the sample dataset")
    return 0


def summary() -> int:
    from .resources.artifacts import ArtifactStoreResource

    store = ArtifactStoreResource.from_env().store()
    try:
        adapter = store.get_json("dagster/assets/lora_adapter.json")
        checkpoints = store.get_json("dagster/assets/training_checkpoints.json")
        evaluation = store.get_json("dagster/assets/adapter_evaluation.json")
    except ArtifactError as error:
        print(f"nothing materialised yet ({error}); run `make demo`", file=sys.stderr)
        return 1
    training = adapter["training"]
    print("\npixtrain-dagster: latest results")
    print(f"  LoRA adapter       {adapter['uri']}  (sha256 {adapter['sha256'][:16]})")
    print(f"  checkpoints        {len(checkpoints['checkpoints'])}, newest {checkpoints['checkpoints'][-1]['uri']}"
          if checkpoints["checkpoints"] else "  checkpoints        none")
    print(f"  evaluation report  {evaluation['uri']}/evaluation.md")
    print(f"  training           {training['final_step']} steps, train loss {training['final_train_loss']:.4f}, "
          f"{training['tokens_per_second']:.1f} tokens/s on {training['device']}")
    print(f"  validation         perplexity base {evaluation['base']['perplexity']:.2f} -> adapter "
          f"{evaluation['adapter']['perplexity']:.2f}")
    for label, key, describe in (
        ("bias report", "dagster/assets/bias_report.json",
         lambda v: f"{v['uri']}/bias_report.md  (gate: {v['verdict']['status']})"),
        ("promoted adapter", "promoted/CURRENT.json",
         lambda v: f"{v['uri']}  (model card README.md; adapter sha256 {v['adapter_sha256'][:16]})"),
    ):
        try:
            print(f"  {label:<18} {describe(store.get_json(key))}")
        except ArtifactError:
            print(f"  {label:<18} not materialised (a blocking check failed, or the run stopped before it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixtrain_dagster.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    seed_parser = commands.add_parser("seed", help="copy the sample dataset into the landing location")
    seed_parser.add_argument("--force", action="store_true", help="copy even when JSONL files are already there")
    commands.add_parser("summary", help="print where the latest adapter, checkpoints and report are")
    args = parser.parse_args(argv)
    return seed(args.force) if args.command == "seed" else summary()


if __name__ == "__main__":
    sys.exit(main())
