"""TrainingMetadataStore: the auditable record of datasets, training runs, checkpoints, evaluations and
promotions, on PostgreSQL (psycopg 3) in production and on an embedded SQLite file otherwise.

Reliability rules every public write follows:
- one transaction per call;
- idempotent: an upsert keyed on (Dagster run id, step key, artifact), or an insert with an idempotency key,
  so re-running a step, resuming, or replaying the call after an ambiguous failure never duplicates rows;
- connection failures (server restarted, backend terminated, network blip) are retried a bounded number of
  times with exponential backoff on a fresh connection; since the write is idempotent, replaying it is safe
  even when the first COMMIT reached the server but its acknowledgement did not reach us.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from pixtrain_dagster.core.backoff import Backoff
from pixtrain_dagster.metadata import schema
from pixtrain_dagster.metadata.urls import describe_database, normalize_database_url

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary constant: serialises concurrent migrate() calls (several step processes starting at once).
_MIGRATION_ADVISORY_LOCK_ID = 0x70697874726E  # "pixtrn"
_TIMESTAMP_KEYS_IN_LINEAGE_JSON = ("created_at", "occurred_at")


class MetadataStoreError(RuntimeError):
    """Base class of the store's own errors."""


class MetadataStoreUnavailable(MetadataStoreError):
    """The database could not be reached (or kept failing) within the retry budget."""


class UnknownTrainingRun(MetadataStoreError, LookupError):
    """A checkpoint or result was recorded for a (run id, step key) that start_training_run never saw."""


# Writes mid-run ride out a server restart or failover (backoff total ~15 s plus reconnects).
DEFAULT_WRITE_RETRY = Backoff(max_attempts=6, initial_delay_s=0.5, max_delay_s=8.0)
# At start, a database that is not there should fail the step quickly and clearly, not after a minute.
DEFAULT_STARTUP_RETRY = Backoff(max_attempts=3, initial_delay_s=0.5, max_delay_s=2.0)


def utc_now() -> datetime:
    return datetime.now(UTC)


class TrainingMetadataStore:
    """Training metadata on PostgreSQL or SQLite. Build with :meth:`from_url`; call :meth:`migrate` once at start."""

    def __init__(
        self,
        engine: Engine,
        *,
        write_retry: Backoff = DEFAULT_WRITE_RETRY,
        startup_retry: Backoff = DEFAULT_STARTUP_RETRY,
    ) -> None:
        self.engine = engine
        self.write_retry = write_retry
        self.startup_retry = startup_retry
        self._password = engine.url.password

    # ------------------------------------------------------------------------------------------------ setup

    @classmethod
    def from_url(
        cls,
        url: str | URL | None,
        *,
        sqlite_path: str | Path | None = None,
        connect_timeout_s: int = 5,
        statement_timeout_s: int = 60,
        write_retry: Backoff = DEFAULT_WRITE_RETRY,
        startup_retry: Backoff = DEFAULT_STARTUP_RETRY,
    ) -> TrainingMetadataStore:
        """A store on ``url`` (postgresql://... runs on psycopg 3), or on the SQLite file ``sqlite_path`` when
        ``url`` is None or empty. Connects lazily: call :meth:`migrate` (or :meth:`ping`) to fail fast.
        """
        if url:
            engine = _create_postgres_or_sqlite_engine(
                normalize_database_url(url), connect_timeout_s, statement_timeout_s
            )
        elif sqlite_path is not None:
            engine = _create_sqlite_engine(Path(sqlite_path))
        else:
            raise ValueError("no metadata database configured: pass a database URL or a SQLite file path")
        return cls(engine, write_retry=write_retry, startup_retry=startup_retry)

    @property
    def backend(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self.engine.dialect.name

    def describe(self) -> str:
        """Where the store is, safe to log: host, port and database, or the SQLite path; never credentials."""
        return describe_database(self.engine.url)

    def __repr__(self) -> str:
        return f"TrainingMetadataStore({self.describe()})"

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TrainingMetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def ping(self) -> None:
        """Connect once (with the startup retry budget); raises MetadataStoreUnavailable naming host:port."""
        self._transact("connect", lambda conn: conn.execute(sa.text("SELECT 1")), self.startup_retry)

    def migrate(self, revision: str = "head") -> str | None:
        """Create or upgrade the schema to ``revision``; a no-op when already there. Returns the new revision.

        One transaction (Postgres has transactional DDL; SQLite runs under BEGIN IMMEDIATE), serialised
        against concurrent callers, so parallel step processes can all call it at start.
        """
        from alembic import command

        def upgrade(conn: Connection) -> str | None:
            self._lock_for_migration(conn)
            command.upgrade(self._alembic_config(conn), revision)
            return _current_revision(conn)

        return self._transact("migrate", upgrade, self.startup_retry)

    def downgrade(self, revision: str) -> str | None:
        """Downgrade the schema (``"base"`` removes every table). For tests and operators; never called by assets."""
        from alembic import command

        def downgrade(conn: Connection) -> str | None:
            self._lock_for_migration(conn)
            command.downgrade(self._alembic_config(conn), revision)
            return _current_revision(conn)

        return self._transact("downgrade", downgrade, self.startup_retry)

    def apply_grants(self, writer_role: str, *, create_role: bool = False) -> list[str]:
        """Give ``writer_role`` (the pipeline's group role) exactly the privileges the store's writes need, after
        :meth:`migrate`, as the owner. Idempotent. PostgreSQL only; see ``metadata/roles.py``."""
        from pixtrain_dagster.metadata.roles import apply_grants

        def grant(conn: Connection) -> list[str]:
            self._lock_for_migration(conn)
            return apply_grants(conn, writer_role, create_role=create_role)

        return self._transact("apply_grants", grant, self.startup_retry)

    def least_privilege_problems(self) -> list[str]:
        """Why the connected role could rewrite the audit trail or run DDL (empty for a proper pipeline role)."""
        from pixtrain_dagster.metadata.roles import least_privilege_problems

        return self._transact("check privileges", least_privilege_problems, self.startup_retry)

    def current_revision(self) -> str | None:
        return self._transact("read schema revision", _current_revision, self.startup_retry)

    @staticmethod
    def head_revision() -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(_alembic_config_without_connection()).get_current_head()

    # ------------------------------------------------------------------------------------------------ writes

    def record_dataset_version(
        self,
        dataset_hash: str,
        *,
        source_uri: str,
        num_rows_raw: int,
        num_rows_clean: int,
        scrub_counts: Mapping[str, int],
        run_id: str | None = None,
        actor: str = "pixtrain",
    ) -> None:
        """Record a cleaned dataset version, keyed by its content hash (first record wins), and an audit event.

        ``scrub_counts`` holds counts per PHI kind only, never the scrubbed text.
        """
        now = utc_now()

        def write(conn: Connection) -> None:
            self._insert_or_ignore(
                conn,
                schema.dataset_versions,
                {
                    "dataset_hash": dataset_hash,
                    "source_uri": source_uri,
                    "num_rows_raw": num_rows_raw,
                    "num_rows_clean": num_rows_clean,
                    "scrub_counts": dict(scrub_counts),
                    "recorded_by_run_id": run_id,
                    "created_at": now,
                },
                key_columns=("dataset_hash",),
            )
            self._insert_audit_event(
                conn,
                event_key=f"dataset_version_recorded:{dataset_hash}:{run_id or '-'}",
                event="dataset_version_recorded",
                actor=actor,
                artifact_uri=source_uri,
                artifact_sha256=dataset_hash,
                run_id=run_id,
                step_key=None,
                details={"num_rows_raw": num_rows_raw, "num_rows_clean": num_rows_clean},
                occurred_at=now,
            )

        self._transact("record_dataset_version", write)

    def start_training_run(
        self,
        run_id: str,
        step_key: str,
        *,
        dataset_hash: str,
        base_model_ref: str,
        base_model_sha256: str,
        code_version: str,
        hyperparameters: Mapping[str, Any],
        git_commit: str | None = None,
        attempt: int = 0,
        actor: str = "pixtrain",
    ) -> int:
        """Mark the training step (Dagster run id + step key) as running; returns the training run's row id.

        A retried step (same run id and step key, ``attempt`` = Dagster's retry number) updates the same row and
        clears the previous attempt's results; each attempt leaves its own ``training_run_started`` audit event.
        The dataset version must have been recorded first (foreign key).
        """
        now = utc_now()
        values = {
            "dagster_run_id": run_id,
            "step_key": step_key,
            "attempt": attempt,
            "dataset_hash": dataset_hash,
            "base_model_ref": base_model_ref,
            "base_model_sha256": base_model_sha256,
            "code_version": code_version,
            "git_commit": git_commit,
            "hyperparameters": json_safe(hyperparameters),
            "status": "running",
            "started_at": now,
            "finished_at": None,
            "metrics": None,
            "adapter_uri": None,
            "adapter_sha256": None,
        }

        def write(conn: Connection) -> int:
            training_run_id = self._upsert(
                conn,
                schema.training_runs,
                values,
                key_columns=("dagster_run_id", "step_key"),
                returning=schema.training_runs.c.id,
            )
            self._insert_audit_event(
                conn,
                event_key=f"training_run_started:{run_id}:{step_key}:{attempt}",
                event="training_run_started",
                actor=actor,
                artifact_uri=None,
                artifact_sha256=None,
                run_id=run_id,
                step_key=step_key,
                details={
                    "attempt": attempt,
                    "dataset_hash": dataset_hash,
                    "base_model_ref": base_model_ref,
                    "base_model_sha256": base_model_sha256,
                    "code_version": code_version,
                    "git_commit": git_commit,
                },
                occurred_at=now,
            )
            return training_run_id

        return self._transact("start_training_run", write)

    def record_checkpoint(
        self,
        run_id: str,
        step_key: str,
        *,
        global_step: int,
        uri: str,
        sha256: str,
        size_bytes: int,
    ) -> None:
        """Upsert the checkpoint taken at optimizer step ``global_step`` of the training step (run id, step key)."""
        now = utc_now()

        def write(conn: Connection) -> None:
            self._upsert(
                conn,
                schema.checkpoints,
                {
                    "training_run_id": _training_run_id(conn, run_id, step_key),
                    "global_step": global_step,
                    "uri": uri,
                    "sha256": sha256,
                    "size_bytes": size_bytes,
                    "created_at": now,
                },
                key_columns=("training_run_id", "global_step"),
            )

        self._transact("record_checkpoint", write)

    def finish_training_run(
        self,
        run_id: str,
        step_key: str,
        *,
        status: str,
        metrics: Mapping[str, Any] | None = None,
        adapter_uri: str | None = None,
        adapter_sha256: str | None = None,
        attempt: int = 0,
        actor: str = "pixtrain",
    ) -> None:
        """Record the outcome of a training step: status (succeeded/failed/canceled), metrics and the adapter."""
        if status not in schema.FINISHED_STATUSES:
            raise ValueError(f"status must be one of {schema.FINISHED_STATUSES}, got {status!r}")
        now = utc_now()

        def write(conn: Connection) -> None:
            table = schema.training_runs
            updated = conn.execute(
                table.update()
                .where(table.c.dagster_run_id == run_id, table.c.step_key == step_key)
                .values(
                    status=status,
                    finished_at=now,
                    metrics=json_safe(metrics) if metrics is not None else None,
                    adapter_uri=adapter_uri,
                    adapter_sha256=adapter_sha256,
                )
            )
            if updated.rowcount == 0:
                raise UnknownTrainingRun(
                    f"finish_training_run: no training run for run id {run_id!r}, step {step_key!r}; "
                    "call start_training_run first"
                )
            self._insert_audit_event(
                conn,
                event_key=f"training_run_finished:{run_id}:{step_key}:{attempt}",
                event="training_run_finished",
                actor=actor,
                artifact_uri=adapter_uri,
                artifact_sha256=adapter_sha256,
                run_id=run_id,
                step_key=step_key,
                details={"status": status, "attempt": attempt},
                occurred_at=now,
            )

        self._transact("finish_training_run", write)

    def record_evaluation(
        self,
        run_id: str,
        step_key: str,
        *,
        adapter_sha256: str,
        eval_name: str,
        metrics: Mapping[str, Any],
        passed: bool | None = None,
        eval_dataset_hash: str | None = None,
    ) -> None:
        """Upsert the result of evaluation ``eval_name`` of adapter ``adapter_sha256``, run by (run id, step key)."""
        now = utc_now()

        def write(conn: Connection) -> None:
            self._upsert(
                conn,
                schema.evaluations,
                {
                    "dagster_run_id": run_id,
                    "step_key": step_key,
                    "adapter_sha256": adapter_sha256,
                    "eval_name": eval_name,
                    "eval_dataset_hash": eval_dataset_hash,
                    "metrics": json_safe(metrics),
                    "passed": passed,
                    "created_at": now,
                },
                key_columns=("dagster_run_id", "step_key", "adapter_sha256", "eval_name"),
            )

        self._transact("record_evaluation", write)

    def append_audit_event(
        self,
        event: str,
        *,
        actor: str,
        artifact_uri: str | None = None,
        artifact_sha256: str | None = None,
        run_id: str | None = None,
        step_key: str | None = None,
        details: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Append an audit event (e.g. ``adapter_promoted``); returns its idempotency key.

        Pass ``idempotency_key`` when a re-run of the same step must not log the event again, e.g.
        ``f"adapter_promoted:{adapter_sha256}:{run_id}"``. Without one, a fresh key is drawn once per call, so
        this call's own retries still insert exactly one row. ``details``: identifiers and decisions, never PHI.
        """
        event_key = idempotency_key or f"{event}:{uuid.uuid4()}"
        now = utc_now()

        def write(conn: Connection) -> None:
            self._insert_audit_event(
                conn,
                event_key=event_key,
                event=event,
                actor=actor,
                artifact_uri=artifact_uri,
                artifact_sha256=artifact_sha256,
                run_id=run_id,
                step_key=step_key,
                details=dict(details or {}),
                occurred_at=now,
            )

        self._transact("append_audit_event", write)
        return event_key

    # ------------------------------------------------------------------------------------------------ reads

    def lineage(self, adapter_sha256_or_uri: str) -> list[dict[str, Any]]:
        """Where did this adapter come from: one dict per training step that produced it, newest first.

        ``adapter_sha256_or_uri``: the adapter's sha256, the URI training wrote it to, or a URI it was later
        published to (e.g. by promotion) as recorded by an audit event carrying both that URI and the sha256.

        Keys are the columns of the ``adapter_lineage`` view: the training run (Dagster run id, step key,
        status, times, hyperparameters, metrics), base model ref + sha256, code version + git commit, dataset
        version (hash, source, row and scrub counts), and JSON lists ``checkpoints``, ``evaluations`` and
        ``audit_events`` (promotions included). Empty when nothing produced it. One SQL statement.
        """
        statement = lineage_statement(adapter_sha256_or_uri)
        rows = self._transact("lineage", lambda conn: conn.execute(statement).mappings().all(), self.write_retry)
        return [_normalise_lineage_row(row) for row in rows]

    def count_rows(self, table_name: str) -> int:
        """Row count of one of the store's tables (tests, health checks)."""
        table = schema.metadata.tables[table_name]
        return self._transact(
            "count_rows",
            lambda conn: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one(),
        )

    # ------------------------------------------------------------------------------------------------ internals

    def _transact(self, operation: str, work: Callable[[Connection], T], retry: Backoff | None = None) -> T:
        """Run ``work`` in one transaction, retrying it on a fresh connection when the connection fails."""
        retry = retry or self.write_retry
        started = time.monotonic()
        backoffs = retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except (OperationalError, InterfaceError) as exc:
                # OperationalError/InterfaceError: the server went away, refused, timed out, or (SQLite) the
                # file stayed locked. Integrity, programming and trigger errors are not retried.
                cause = self._redact(_one_line(exc))
                delay = next(backoffs, None)
                if delay is None:
                    elapsed = time.monotonic() - started
                    raise MetadataStoreUnavailable(
                        f"{operation}: metadata database {self.describe()} unavailable after {attempt} "
                        f"attempt(s) in {elapsed:.1f}s: {cause}"
                    ) from exc
                logger.warning(
                    "%s: metadata database %s failed (attempt %d/%d), retrying in %.1fs: %s",
                    operation,
                    self.describe(),
                    attempt,
                    retry.max_attempts,
                    delay,
                    cause,
                )
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    # Drop the other pooled connections too: after a restart they are all dead.
                    self.engine.dispose(close=False)
                time.sleep(delay)

    def _redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _lock_for_migration(self, conn: Connection) -> None:
        if self.backend == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": _MIGRATION_ADVISORY_LOCK_ID})
        # SQLite: the transaction began with BEGIN IMMEDIATE, which already holds the database's write lock.

    def _alembic_config(self, conn: Connection):
        config = _alembic_config_without_connection()
        config.attributes["connection"] = conn
        return config

    def _insert_statement(self, table: sa.Table):
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _upsert(
        self,
        conn: Connection,
        table: sa.Table,
        values: Mapping[str, Any],
        *,
        key_columns: tuple[str, ...],
        returning: sa.Column | None = None,
    ) -> Any:
        statement = self._insert_statement(table).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=list(key_columns),
            set_={name: statement.excluded[name] for name in values if name not in key_columns},
        )
        if returning is not None:
            return conn.execute(statement.returning(returning)).scalar_one()
        conn.execute(statement)
        return None

    def _insert_or_ignore(
        self, conn: Connection, table: sa.Table, values: Mapping[str, Any], *, key_columns: tuple[str, ...]
    ) -> None:
        statement = self._insert_statement(table).values(**values)
        conn.execute(statement.on_conflict_do_nothing(index_elements=list(key_columns)))

    def _insert_audit_event(
        self,
        conn: Connection,
        *,
        event_key: str,
        event: str,
        actor: str,
        artifact_uri: str | None,
        artifact_sha256: str | None,
        run_id: str | None,
        step_key: str | None,
        details: Mapping[str, Any],
        occurred_at: datetime,
    ) -> None:
        # ON CONFLICT DO NOTHING is an insert that inserts nothing: the append-only trigger does not fire.
        self._insert_or_ignore(
            conn,
            schema.audit_events,
            {
                "event_key": event_key,
                "event": event,
                "actor": actor,
                "artifact_uri": artifact_uri,
                "artifact_sha256": artifact_sha256,
                "dagster_run_id": run_id,
                "step_key": step_key,
                "details": dict(details),
                "occurred_at": occurred_at,
            },
            key_columns=("event_key",),
        )


def lineage_statement(adapter_sha256_or_uri: str) -> sa.Select:
    """One statement: the ``adapter_lineage`` rows of the adapter with this sha256, trained to this URI, or
    published (promoted, copied) to this URI according to an audit event that names both URI and sha256::

        SELECT * FROM adapter_lineage WHERE adapter_sha256 IN (
            SELECT adapter_sha256 FROM training_runs WHERE adapter_sha256 = :x OR adapter_uri = :x
            UNION SELECT artifact_sha256 FROM audit_events WHERE artifact_uri = :x
        ) ORDER BY training_run_id DESC

    Written as one IN (...) rather than ORs next to a sub-select: Postgres then plans a semi-join on indexes
    (0.3 ms at 10k runs) instead of a sequential scan (50 ms).
    """
    view, runs, events = schema.adapter_lineage, schema.training_runs, schema.audit_events
    wanted = sa.union(
        sa.select(runs.c.adapter_sha256).where(
            sa.or_(runs.c.adapter_sha256 == adapter_sha256_or_uri, runs.c.adapter_uri == adapter_sha256_or_uri)
        ),
        sa.select(events.c.artifact_sha256).where(events.c.artifact_uri == adapter_sha256_or_uri),
    )
    return sa.select(view).where(view.c.adapter_sha256.in_(wanted)).order_by(view.c.training_run_id.desc())


def _training_run_id(conn: Connection, run_id: str, step_key: str) -> int:
    table = schema.training_runs
    training_run_id = conn.execute(
        sa.select(table.c.id).where(table.c.dagster_run_id == run_id, table.c.step_key == step_key)
    ).scalar_one_or_none()
    if training_run_id is None:
        raise UnknownTrainingRun(
            f"no training run for run id {run_id!r}, step {step_key!r}; call start_training_run first"
        )
    return training_run_id


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE}).get_current_revision()


def _alembic_config_without_connection():
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


def _one_line(exc: BaseException) -> str:
    """The driver's own message (e.g. 'connection to server at "db", port 5432 failed: Connection refused')."""
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split()) or type(original).__name__


def _as_utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    # SQLite hands back naive datetimes; everything the store writes is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _normalise_lineage_row(row: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(row)
    for key in ("started_at", "finished_at"):
        result[key] = _as_utc(result[key])
    for key in ("checkpoints", "evaluations", "audit_events"):
        items = result[key] or []
        for item in items:
            for time_key in _TIMESTAMP_KEYS_IN_LINEAGE_JSON:
                if time_key in item:
                    item[time_key] = _as_utc(item[time_key])
        result[key] = items
    return result


# ---------------------------------------------------------------------------------------------------- engines


def _create_postgres_or_sqlite_engine(url: URL, connect_timeout_s: int, statement_timeout_s: int) -> Engine:
    if url.get_backend_name() == "sqlite":
        if not url.database:
            raise ValueError("a sqlite:// metadata URL needs a file path (in-memory databases are not shared)")
        return _create_sqlite_engine(Path(url.database))
    # Server options given in the URL (e.g. ?options=-csearch_path%3Dpixtrain, to keep the training record in
    # its own schema) are kept and extended, not replaced, by ours.
    server_options = " ".join(
        filter(
            None,
            [
                url.query.get("options"),
                f"-c statement_timeout={int(statement_timeout_s * 1000)}",
                f"-c lock_timeout={int(statement_timeout_s * 1000)}",
                "-c TimeZone=UTC",  # timestamps inside the lineage JSON render the same on every server
                "-c jit=off",  # JIT compiling costs tens of ms, more than any of these small queries
            ],
        )
    )
    return sa.create_engine(
        url.difference_update_query(["options"]),
        # A pooled connection killed while idle (server restart, pg_terminate_backend, a NAT timeout during a
        # multi-hour training step) is detected at checkout and replaced instead of failing the write.
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=2,
        max_overflow=2,
        pool_timeout=30,
        # Statement parameters can include URIs and JSON details; keep them out of exception text and logs.
        hide_parameters=True,
        connect_args={
            # libpq's bound on establishing a connection (DNS + TCP + auth); psycopg enforces at least 2 s.
            "connect_timeout": max(2, int(connect_timeout_s)),
            "application_name": "pixtrain-metadata",
            # Detect a dead peer on an idle connection in ~1 min instead of the kernel's 2 h.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            # Bound every statement and lock wait: a stuck lock fails the write (and is retried), never hangs.
            "options": server_options,
        },
    )


def _create_sqlite_engine(path: Path) -> Engine:
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        URL.create("sqlite+pysqlite", database=str(path)),
        hide_parameters=True,
        # Seconds a writer waits for another process's write lock before "database is locked".
        connect_args={"timeout": 30},
    )

    @sa.event.listens_for(engine, "connect")
    def _configure_sqlite_connection(dbapi_connection, _record) -> None:
        # Take transaction control away from the sqlite3 module (it would not BEGIN before DDL, so a failed
        # migration could leave half a schema); the "begin" hook below emits BEGIN IMMEDIATE instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers (the Dagster UI, an auditor) do not block the training step's writes.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        # Take the write lock up front: two processes migrating or upserting at once serialise instead of
        # failing with "database is locked" when a read transaction tries to upgrade to a write.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def json_safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats (a diverged loss) become null: JSON has no NaN and Postgres JSONB rejects the token."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dict(values))
