"""Small operator commands: ``python -m pixtrain_dagster.cli seed|summary|restore|upload-db-dump``.

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


def restore_command(args: argparse.Namespace) -> int:
    """Restore artifacts from the backup location into a store (default: the configured artifact store)."""
    import os

    from .core.artifacts import ArtifactStore
    from .core.backup import BACKUP_URI_ENV, BackupError, list_backup, restore, verify_backup
    from .resources.artifacts import ArtifactStoreResource

    backup_uri = args.backup_uri or os.environ.get(BACKUP_URI_ENV, "").strip()
    if not backup_uri:
        print(f"no backup location: pass --from or set {BACKUP_URI_ENV}", file=sys.stderr)
        return 2
    if args.list:
        artifacts, documents = list_backup(backup_uri)
        for key in [*artifacts, *documents]:
            print(key)
        return 0
    if args.verify:
        problems = verify_backup(backup_uri)
        for key, found in problems.items():
            print(f"DAMAGED {key}: {found[0]}")
        print(f"{len(problems)} damaged artifact(s) at {backup_uri}")
        return 1 if problems else 0
    if not args.keys and not args.all:
        print("name the artifacts to restore (e.g. adapters/<fingerprint>), or pass --all", file=sys.stderr)
        return 2
    target = ArtifactStore(args.to) if args.to else ArtifactStoreResource.from_env().store()
    try:
        result = restore(backup_uri, target, keys=args.keys or None, prefix=args.prefix,
                         allow_non_empty=args.allow_non_empty)
    except BackupError as error:
        print(f"restore failed: {error}", file=sys.stderr)
        return 1
    for key in [*result.restored, *result.documents_restored]:
        print(f"restored {target.uri(key)}")
    print(f"{len(result.restored)} artifact(s) and {len(result.documents_restored)} document(s) restored into "
          f"{target.root}; {result.files_verified} file(s) verified against their sha256")
    return 0


def upload_db_dump_command(args: argparse.Namespace) -> int:
    """Upload a pg_dump -Fc file to <backup>/postgres/ and prune old dumps (the chart's CronJob runs this)."""
    import os

    from .core.backup import BACKUP_URI_ENV, BackupError, upload_database_dump

    backup_uri = args.backup_uri or os.environ.get(BACKUP_URI_ENV, "").strip()
    if not backup_uri:
        print(f"no backup location: pass --to or set {BACKUP_URI_ENV}", file=sys.stderr)
        return 2
    try:
        key = upload_database_dump(args.dump_file, backup_uri, keep=args.keep)
    except (BackupError, ValueError) as error:
        print(f"database backup failed: {error}", file=sys.stderr)
        return 1
    print(f"database dump uploaded and verified: {backup_uri.rstrip('/')}/{key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixtrain_dagster.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    seed_parser = commands.add_parser("seed", help="copy the sample dataset into the landing location")
    seed_parser.add_argument("--force", action="store_true", help="copy even when JSONL files are already there")
    commands.add_parser("summary", help="print where the latest adapter, checkpoints and report are")
    restore_parser = commands.add_parser(
        "restore", help="restore artifacts (or everything) from the backup location, verifying every sha256")
    restore_parser.add_argument("keys", nargs="*", help="artifact keys, e.g. adapters/<fingerprint> promoted/CURRENT.json")
    restore_parser.add_argument("--all", action="store_true", help="restore everything (into an empty store)")
    restore_parser.add_argument("--prefix", help="only keys under this prefix, e.g. checkpoints/<fingerprint>")
    restore_parser.add_argument("--from", dest="backup_uri", help="backup URI (default $PIXTRAIN_BACKUP_URI)")
    restore_parser.add_argument("--to", help="target store root (default $PIXTRAIN_ARTIFACT_ROOT)")
    restore_parser.add_argument("--allow-non-empty", action="store_true",
                                help="with --all: restore into a store that already holds artifacts")
    restore_parser.add_argument("--list", action="store_true", help="list what the backup holds, restore nothing")
    restore_parser.add_argument("--verify", action="store_true", help="re-hash the whole backup, restore nothing")
    dump_parser = commands.add_parser("upload-db-dump", help="upload a pg_dump -Fc file to the backup location")
    dump_parser.add_argument("dump_file")
    dump_parser.add_argument("--to", dest="backup_uri", help="backup URI (default $PIXTRAIN_BACKUP_URI)")
    dump_parser.add_argument("--keep", type=int, default=14, help="dumps to keep (older ones are deleted)")
    args = parser.parse_args(argv)
    if args.command == "restore":
        return restore_command(args)
    if args.command == "upload-db-dump":
        return upload_db_dump_command(args)
    return seed(args.force) if args.command == "seed" else summary()


if __name__ == "__main__":
    sys.exit(main())
