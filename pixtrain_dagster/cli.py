"""Small operator commands: ``python -m pixtrain_dagster.cli seed|summary|db-migrate|db-setup-sql``.

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
        raise SystemExit(f"db-migrate: set {OWNER_URL_ENV_VAR}, or PIXTRAIN_DB_HOST and PIXTRAIN_DB_OWNER_USER "
                         "(and PIXTRAIN_DB_OWNER_PASSWORD): migrations run as the owner role, never the pipeline's")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixtrain_dagster.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    seed_parser = commands.add_parser("seed", help="copy the sample dataset into the landing location")
    seed_parser.add_argument("--force", action="store_true", help="copy even when JSONL files are already there")
    commands.add_parser("summary", help="print where the latest adapter, checkpoints and report are")
    from .metadata.roles import DEFAULT_WRITER_ROLE, WRITER_ROLE_ENV_VAR

    import os

    writer_default = os.environ.get(WRITER_ROLE_ENV_VAR) or DEFAULT_WRITER_ROLE
    migrate_parser = commands.add_parser(
        "db-migrate", help="as the OWNER role: upgrade the metadata schema and grant the pipeline's role")
    migrate_parser.add_argument("--writer-role", default=writer_default,
                                help=f"group role of the pipeline's login role (default {writer_default})")
    migrate_parser.add_argument("--create-role", action="store_true",
                                help="create the writer role if missing (the owner needs CREATEROLE)")
    setup_parser = commands.add_parser("db-setup-sql", help="print the one-time SQL a DBA runs to create the roles")
    setup_parser.add_argument("--writer-role", default=writer_default)
    setup_parser.add_argument("--login-role", default="pixtrain")
    setup_parser.add_argument("--owner-role", default="pixtrain_owner")
    setup_parser.add_argument("--database", default="pixtrain_metadata")
    setup_parser.add_argument("--schema", default="pixtrain")
    args = parser.parse_args(argv)
    if args.command == "db-migrate":
        return db_migrate(args.writer_role, args.create_role)
    if args.command == "db-setup-sql":
        from .metadata.roles import dba_setup_sql

        print(dba_setup_sql(args.writer_role, args.login_role, args.owner_role, args.database, args.schema))
        return 0
    return seed(args.force) if args.command == "seed" else summary()


if __name__ == "__main__":
    sys.exit(main())
