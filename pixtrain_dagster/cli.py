"""Small operator commands: ``python -m pixtrain_dagster.cli COMMAND`` (``--help`` lists them).

``seed`` copies the packaged sample dataset into the landing location (skipped when chat JSONL is already
there); ``summary`` prints where the latest adapter, checkpoints, reports and promoted adapter are;
``forget`` removes a person's conversations (core/deletion.py) and ``purge-snapshots`` applies the raw-snapshot
retention, both recorded in the audit trail.
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
    print(
        f"  checkpoints        {len(checkpoints['checkpoints'])}, newest {checkpoints['checkpoints'][-1]['uri']}"
        if checkpoints["checkpoints"]
        else "  checkpoints        none"
    )
    print(f"  evaluation report  {evaluation['uri']}/evaluation.md")
    print(
        f"  training           {training['final_step']} steps, train loss {training['final_train_loss']:.4f}, "
        f"{training['tokens_per_second']:.1f} tokens/s on {training['device']}"
    )
    print(
        f"  validation         perplexity base {evaluation['base']['perplexity']:.2f} -> adapter "
        f"{evaluation['adapter']['perplexity']:.2f}"
    )
    for label, key, describe in (
        (
            "bias report",
            "dagster/assets/bias_report.json",
            lambda v: f"{v['uri']}/bias_report.md  (gate: {v['verdict']['status']})",
        ),
        (
            "promoted adapter",
            "promoted/CURRENT.json",
            lambda v: f"{v['uri']}  (model card README.md; adapter sha256 {v['adapter_sha256'][:16]})",
        ),
    ):
        try:
            print(f"  {label:<18} {describe(store.get_json(key))}")
        except ArtifactError:
            print(f"  {label:<18} not materialised (a blocking check failed, or the run stopped before it)")
    return 0


OWNER_URL_ENV_VAR = "PIXTRAIN_METADATA_OWNER_DATABASE_URL"


def owner_database_url(environ=None):
    """The metadata database as its OWNER role: ``$PIXTRAIN_METADATA_OWNER_DATABASE_URL``, or the
    ``PIXTRAIN_DB_*`` variables with ``PIXTRAIN_DB_OWNER_USER`` / ``PIXTRAIN_DB_OWNER_PASSWORD`` in place of the
    pipeline's user and password (the Helm hook Job sets these from the owner's Secret)."""
    import os

    from .metadata import database_url_from_env

    env = dict(os.environ if environ is None else environ)
    if env.get(OWNER_URL_ENV_VAR, "").strip():
        return database_url_from_env(env, url_env_var=OWNER_URL_ENV_VAR)
    owner = env.get("PIXTRAIN_DB_OWNER_USER", "").strip()
    if not owner or not env.get("PIXTRAIN_DB_HOST", "").strip():
        raise SystemExit(
            f"db-migrate: set {OWNER_URL_ENV_VAR}, or PIXTRAIN_DB_HOST and PIXTRAIN_DB_OWNER_USER "
            "(and PIXTRAIN_DB_OWNER_PASSWORD): migrations run as the owner role, never the pipeline's"
        )
    env.pop("PIXTRAIN_METADATA_DATABASE_URL", None)
    env["PIXTRAIN_DB_USER"] = owner
    env["PIXTRAIN_DB_PASSWORD"] = env.get("PIXTRAIN_DB_OWNER_PASSWORD", "")
    return database_url_from_env(env)


def db_migrate(writer_role: str, create_role: bool) -> int:
    """Upgrade the metadata schema as the owner role, then (re-)grant the pipeline's writer role."""
    from .metadata import TrainingMetadataStore
    from .metadata.roles import RoleSetupError

    with TrainingMetadataStore.from_url(owner_database_url()) as store:
        revision = store.migrate()
        print(f"metadata schema at {revision} on {store.describe()}")
        try:
            statements = store.apply_grants(writer_role, create_role=create_role)
        except RoleSetupError as error:
            print(f"db-migrate: {error}", file=sys.stderr)
            return 2
        print(f"granted {writer_role} the pipeline's privileges ({len(statements)} statements)")
    return 0


def _audit(event: str, actor: str, details: dict) -> str:
    from .resources.metadata import TrainingMetadataResource

    store = TrainingMetadataResource().get_store()
    try:
        return store.append_audit_event(event, actor=actor, details=details)
    finally:
        store.dispose()


def _actor(given: str | None) -> str:
    import getpass

    return given or f"cli:{getpass.getuser()}"


def forget(record_hashes: list[str], terms_from: str | None, dry_run: bool, actor: str | None) -> int:
    """Remove a person's conversations everywhere (core/deletion.py) and record it in the audit trail."""
    from .core.deletion import Request
    from .core.deletion import forget as forget_records
    from .resources.artifacts import ArtifactStoreResource

    terms: list[str] = []
    if terms_from:  # from a file or stdin, never argv: a term on the command line lands in shell history and ps
        terms = (sys.stdin.read() if terms_from == "-" else Path(terms_from).read_text()).splitlines()
    try:
        request = Request(record_hashes=set(record_hashes), terms=terms)
    except ValueError as error:
        print(f"forget: {error}", file=sys.stderr)
        return 2
    resource = ArtifactStoreResource.from_env()
    report = forget_records(resource.store(), resource.landing_store(), request, dry_run=dry_run)
    for match in report.matches:
        print(f"{'would remove' if dry_run else 'removed'} {match.location}  record {match.record_hash}")
    print(
        f"landing: {report.landing_records_removed} record(s) in {len(report.landing_files_rewritten)} file(s); "
        f"raw snapshots republished: {len(report.raw_snapshots)}; curated datasets republished: "
        f"{len(report.curated_datasets)} ({report.curated_records_removed} record(s)); evaluation samples "
        f"dropped: {len(report.evaluations_redacted)}" + (" (dry run: nothing changed)" if dry_run else "")
    )
    if dry_run:
        return 0
    event_key = _audit("data_deletion", _actor(actor), report.audit_details(request))
    print(
        f"recorded in the audit trail ({event_key}); the new_training_data sensor will start a retraining run "
        "on the changed landing data. Adapters trained before this remain until you retire them."
    )
    return 0


def purge_snapshots(older_than_days: float | None, dry_run: bool, actor: str | None) -> int:
    from .core.artifacts import ArtifactError
    from .core.deletion import purge_raw_snapshots, retention_days_from_env
    from .resources.artifacts import ArtifactStoreResource

    try:
        days = older_than_days if older_than_days is not None else retention_days_from_env()
    except ValueError as error:
        print(f"purge-snapshots: {error}", file=sys.stderr)
        return 2
    store = ArtifactStoreResource.from_env().store()
    try:  # the snapshot the current dataset was built from is kept whatever its age
        keep = [store.get_json("dagster/assets/raw_conversations.json")["key"]]
    except ArtifactError:
        keep = []
    removed = purge_raw_snapshots(store, days, keep=keep, dry_run=dry_run)
    for key in removed:
        print(f"{'would purge' if dry_run else 'purged'} {store.uri(key)}")
    print(f"{len(removed)} raw snapshot(s) older than {days:g} days" + (" (dry run)" if dry_run else ""))
    if removed and not dry_run:
        _audit("raw_snapshots_purged", _actor(actor), {"retention_days": days, "removed": removed, "kept": keep})
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
        result = restore(
            backup_uri, target, keys=args.keys or None, prefix=args.prefix, allow_non_empty=args.allow_non_empty
        )
    except BackupError as error:
        print(f"restore failed: {error}", file=sys.stderr)
        return 1
    for key in [*result.restored, *result.documents_restored]:
        print(f"restored {target.uri(key)}")
    print(
        f"{len(result.restored)} artifact(s) and {len(result.documents_restored)} document(s) restored into "
        f"{target.root}; {result.files_verified} file(s) verified against their sha256"
    )
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
    import os

    from .metadata.roles import DEFAULT_WRITER_ROLE, WRITER_ROLE_ENV_VAR

    writer_default = os.environ.get(WRITER_ROLE_ENV_VAR) or DEFAULT_WRITER_ROLE
    migrate_parser = commands.add_parser(
        "db-migrate", help="as the OWNER role: upgrade the metadata schema and grant the pipeline's role"
    )
    migrate_parser.add_argument(
        "--writer-role",
        default=writer_default,
        help=f"group role of the pipeline's login role (default {writer_default})",
    )
    migrate_parser.add_argument(
        "--create-role", action="store_true", help="create the writer role if missing (the owner needs CREATEROLE)"
    )
    setup_parser = commands.add_parser("db-setup-sql", help="print the one-time SQL a DBA runs to create the roles")
    setup_parser.add_argument("--writer-role", default=writer_default)
    setup_parser.add_argument("--login-role", default="pixtrain")
    setup_parser.add_argument("--owner-role", default="pixtrain_owner")
    setup_parser.add_argument("--database", default="pixtrain_metadata")
    setup_parser.add_argument("--schema", default="pixtrain")
    forget_parser = commands.add_parser(
        "forget", help="remove a person's conversations from landing, raw snapshots and derived datasets"
    )
    forget_parser.add_argument(
        "--record-hash",
        action="append",
        default=[],
        help="sha256 of a record's messages (repeatable; `--dry-run` lists them)",
    )
    forget_parser.add_argument(
        "--terms-from", metavar="FILE", help="search terms, one per line, from FILE or - for stdin (case-insensitive)"
    )
    forget_parser.add_argument(
        "--dry-run", action="store_true", help="list matches (locations, hashes); change nothing"
    )
    forget_parser.add_argument("--actor", help="who asked, for the audit trail (default cli:<user>)")
    purge_parser = commands.add_parser("purge-snapshots", help="remove raw snapshots older than the retention")
    purge_parser.add_argument(
        "--older-than-days", type=float, help="default $PIXTRAIN_RAW_SNAPSHOT_RETENTION_DAYS, else 90"
    )
    purge_parser.add_argument("--dry-run", action="store_true")
    purge_parser.add_argument("--actor")
    restore_parser = commands.add_parser(
        "restore", help="restore artifacts (or everything) from the backup location, verifying every sha256"
    )
    restore_parser.add_argument(
        "keys", nargs="*", help="artifact keys, e.g. adapters/<fingerprint> promoted/CURRENT.json"
    )
    restore_parser.add_argument("--all", action="store_true", help="restore everything (into an empty store)")
    restore_parser.add_argument("--prefix", help="only keys under this prefix, e.g. checkpoints/<fingerprint>")
    restore_parser.add_argument("--from", dest="backup_uri", help="backup URI (default $PIXTRAIN_BACKUP_URI)")
    restore_parser.add_argument("--to", help="target store root (default $PIXTRAIN_ARTIFACT_ROOT)")
    restore_parser.add_argument(
        "--allow-non-empty", action="store_true", help="with --all: restore into a store that already holds artifacts"
    )
    restore_parser.add_argument("--list", action="store_true", help="list what the backup holds, restore nothing")
    restore_parser.add_argument("--verify", action="store_true", help="re-hash the whole backup, restore nothing")
    dump_parser = commands.add_parser("upload-db-dump", help="upload a pg_dump -Fc file to the backup location")
    dump_parser.add_argument("dump_file")
    dump_parser.add_argument("--to", dest="backup_uri", help="backup URI (default $PIXTRAIN_BACKUP_URI)")
    dump_parser.add_argument("--keep", type=int, default=14, help="dumps to keep (older ones are deleted)")
    args = parser.parse_args(argv)
    if args.command == "db-migrate":
        return db_migrate(args.writer_role, args.create_role)
    if args.command == "db-setup-sql":
        from .metadata.roles import dba_setup_sql

        print(dba_setup_sql(args.writer_role, args.login_role, args.owner_role, args.database, args.schema))
        return 0
    if args.command == "forget":
        return forget(args.record_hash, args.terms_from, args.dry_run, args.actor)
    if args.command == "purge-snapshots":
        return purge_snapshots(args.older_than_days, args.dry_run, args.actor)
    if args.command == "restore":
        return restore_command(args)
    if args.command == "upload-db-dump":
        return upload_db_dump_command(args)
    return seed(args.force) if args.command == "seed" else summary()


if __name__ == "__main__":
    sys.exit(main())
