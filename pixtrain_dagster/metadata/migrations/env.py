"""Alembic environment for the training metadata store.

Run programmatically by ``TrainingMetadataStore.migrate()``, which opens a transaction, takes the migration
lock and passes the connection in ``config.attributes["connection"]``. Offline mode (``--sql``, to hand a DBA
the DDL) takes the URL from the ``sqlalchemy.url`` option instead.
"""

from __future__ import annotations

from alembic import context

from pixtrain_dagster.metadata.schema import VERSION_TABLE, metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "run these migrations through TrainingMetadataStore.migrate(), which supplies the connection"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode recreates the table for later migrations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    # The caller's transaction is used as-is (Alembic does not nest one), so the whole upgrade is atomic on
    # both dialects: Postgres has transactional DDL, and the store makes SQLite BEGIN explicitly.
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
