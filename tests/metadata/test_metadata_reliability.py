"""Failure behaviour against a real Postgres: dropped connections, a database that stays away, one that is
never there. Bounded time, clear messages, no password, nothing lost, nothing duplicated."""

from __future__ import annotations

import logging
import socket
import time
import traceback

import pytest
import sqlalchemy as sa

from pixtrain_dagster.metadata import (
    Backoff,
    MetadataStoreUnavailable,
    TrainingMetadataStore,
    normalize_database_url,
)

from .metadata_samples import sha256_of

PASSWORD = "pw-must-not-leak-7f3a"
FAST_RETRY = Backoff(max_attempts=4, initial_delay_s=0.05, max_delay_s=0.2)


def _backend_pid(conn) -> int:
    return conn.connection.dbapi_connection.info.backend_pid


def _terminate(admin_url, pid: int) -> None:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    finally:
        admin.dispose()


def _start_training(store: TrainingMetadataStore, record_training) -> None:
    record_training(store, "run-1", num_checkpoints=0)


@pytest.mark.parametrize("killed_at", ["statement", "commit"])
def test_write_whose_connection_is_terminated_mid_transaction_is_retried_once_and_persisted(
    postgres_url, postgres_admin_url, record_training, caplog, killed_at
):
    store = TrainingMetadataStore.from_url(postgres_url, write_retry=FAST_RETRY)
    store.migrate()
    _start_training(store, record_training)
    victim_pids: list[int] = []

    def kill_once(conn, *args) -> None:
        # pg_terminate_backend on our own session, from another session: what a failover or an admin does.
        if not victim_pids:
            victim_pids.append(_backend_pid(conn))
            _terminate(postgres_admin_url, victim_pids[0])

    def kill_before_insert(conn, cursor, statement, *rest) -> None:
        if statement.startswith("INSERT INTO checkpoints"):
            kill_once(conn)

    if killed_at == "statement":  # the INSERT is sent on a dead connection
        listen = ("before_cursor_execute", kill_before_insert)
    else:  # the INSERT ran inside the transaction; the COMMIT fails, and the server rolls the INSERT back
        listen = ("commit", kill_once)
    sa.event.listen(store.engine, *listen)
    try:
        with caplog.at_level(logging.WARNING, logger="pixtrain_dagster.metadata"):
            store.record_checkpoint(
                "run-1", "lora_adapter", global_step=100, uri="file:///c100", sha256=sha256_of("c100"), size_bytes=7
            )
    finally:
        sa.event.remove(store.engine, *listen)

    assert victim_pids, "the connection was never terminated: the test did not exercise the retry"
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT global_step, uri, size_bytes FROM checkpoints")).all()
        assert _backend_pid(conn) != victim_pids[0]
    assert rows == [(100, "file:///c100", 7)]
    [warning] = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert "record_checkpoint" in warning.getMessage()
    assert f"{postgres_url.host}:{postgres_url.port}" in warning.getMessage()
    store.dispose()


def test_idle_pooled_connection_killed_between_writes_is_replaced_silently(
    postgres_url, postgres_admin_url, record_training, caplog
):
    store = TrainingMetadataStore.from_url(postgres_url, write_retry=FAST_RETRY)
    store.migrate()
    _start_training(store, record_training)
    with store.engine.connect() as conn:
        idle_pid = _backend_pid(conn)
    _terminate(postgres_admin_url, idle_pid)  # e.g. the hours a training step spends between two writes

    with caplog.at_level(logging.WARNING, logger="pixtrain_dagster.metadata"):
        store.record_checkpoint("run-1", "lora_adapter", global_step=1, uri="u", sha256="0" * 64, size_bytes=1)

    assert store.count_rows("checkpoints") == 1
    assert not [record for record in caplog.records if "retrying" in record.getMessage()]  # pool_pre_ping did it
    store.dispose()


def test_database_gone_for_good_mid_run_fails_after_bounded_retries(
    postgres_database_url, postgres_admin_url, record_training
):
    postgres_url = postgres_database_url  # a whole database of its own: the test closes it to connections
    store = TrainingMetadataStore.from_url(postgres_url, write_retry=FAST_RETRY)
    store.migrate()
    _start_training(store, record_training)
    admin = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{postgres_url.database}" ALLOW_CONNECTIONS false'))
        conn.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
            {"name": postgres_url.database},
        )
    admin.dispose()

    started = time.monotonic()
    with pytest.raises(MetadataStoreUnavailable) as raised:
        store.record_checkpoint("run-1", "lora_adapter", global_step=1, uri="u", sha256="0" * 64, size_bytes=1)

    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert message.startswith("record_checkpoint: metadata database postgresql://")
    assert f"{postgres_url.host}:{postgres_url.port}" in message
    assert "after 4 attempt(s)" in message
    assert "not currently accepting connections" in message  # the server's own reason
    store.dispose()


def _assert_no_password(exc: BaseException) -> None:
    assert PASSWORD not in str(exc)
    assert PASSWORD not in "".join(traceback.format_exception(exc))


def test_unreachable_database_at_start_fails_fast_naming_host_port_without_password():
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://pixtrain:{PASSWORD}@127.0.0.1:{port}/metadata"
    store = TrainingMetadataStore.from_url(url)  # default startup policy: what production uses

    started = time.monotonic()
    with pytest.raises(MetadataStoreUnavailable) as raised:
        store.migrate()
    elapsed = time.monotonic() - started

    assert elapsed < 10
    message = str(raised.value)
    assert f"postgresql://127.0.0.1:{port}/metadata" in message
    assert "refused" in message.lower()
    assert "after 3 attempt(s)" in message
    _assert_no_password(raised.value)
    assert PASSWORD not in repr(store)


def test_server_that_accepts_but_never_answers_is_bounded_by_connect_timeout():
    # A listening socket that never accepts: the TCP handshake completes, then silence (a hung server,
    # a half-open load balancer). Without connect_timeout libpq would wait forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        store = TrainingMetadataStore.from_url(
            f"postgresql://pixtrain:{PASSWORD}@127.0.0.1:{port}/metadata",
            connect_timeout_s=2,
            startup_retry=Backoff(max_attempts=1),
        )
        started = time.monotonic()
        with pytest.raises(MetadataStoreUnavailable) as raised:
            store.ping()
        elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 6
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "timeout" in str(raised.value).lower()
    _assert_no_password(raised.value)


@pytest.mark.parametrize(
    "bad_url",
    [
        f"postgresql://pixtrain:{PASSWORD}@db:notaport/metadata",
        f"postgres ql://pixtrain:{PASSWORD}@db/metadata",
        f"mysql://pixtrain:{PASSWORD}@db/metadata",
    ],
)
def test_invalid_database_url_is_rejected_without_echoing_it(bad_url):
    with pytest.raises(ValueError) as raised:
        normalize_database_url(bad_url, source="$PIXTRAIN_METADATA_DATABASE_URL")
    assert "$PIXTRAIN_METADATA_DATABASE_URL" in str(raised.value)
    _assert_no_password(raised.value)
