"""The metadata database backup restores: pg_dump -Fc -> backup store -> pg_restore into an empty database
gives the same lineage answer. Real PostgreSQL and Debian's postgresql-client (scripts/install-test-tools.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from pixtrain_dagster.core.backup import BackupError, fetch_database_dump, list_database_dumps, upload_database_dump
from pixtrain_dagster.metadata import TrainingMetadataStore

from . import metadata_samples
from .conftest import _create_database, _drop_database


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `make tools` (scripts/install-test-tools.sh installs postgresql-client)")
    return path


def _major(text: str) -> int:
    return int(re.search(r"(\d+)(?:\.\d+)?", text).group(1))


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def test_pg_dump_restore_round_trip_gives_the_same_lineage(postgres_database_url, postgres_admin_url, tmp_path):
    pg_dump, pg_restore = _tool("pg_dump"), _tool("pg_restore")
    client_major = _major(subprocess.run([pg_dump, "--version"], capture_output=True, text=True, check=True).stdout)
    engine = sa.create_engine(postgres_database_url)
    with engine.connect() as conn:
        server_major = _major(conn.execute(sa.text("SHOW server_version")).scalar_one())
    engine.dispose()
    assert client_major >= server_major, f"pg_dump {client_major} cannot dump a PostgreSQL {server_major} server"

    with TrainingMetadataStore.from_url(postgres_database_url) as store:
        store.migrate()
        metadata_samples.record_training(store, "run-1", adapter_name="adapter-1")
        sha, uri = metadata_samples.record_training(store, "run-2", adapter_name="adapter-2", num_checkpoints=3)
        store.append_audit_event(
            "adapter_promoted",
            actor="reviewer",
            artifact_uri="file:///promoted/a2",
            artifact_sha256=sha,
            details={"gate": "passed"},
            idempotency_key="promo-1",
        )
        before = store.lineage(sha), store.lineage("file:///promoted/a2")
        counts = {t: store.count_rows(t) for t in ("dataset_versions", "training_runs", "checkpoints", "audit_events")}
    assert before[0] and before[0] == before[1]

    dump = tmp_path / "pixtrain-metadata.dump"
    subprocess.run(
        [pg_dump, "--format=custom", "--no-owner", "--no-privileges", f"--file={dump}", _libpq(postgres_database_url)],
        check=True,
        timeout=120,
    )
    backup_uri = str(tmp_path / "backup")
    stamps = iter([1_700_000_000, 1_700_086_400, 1_700_172_800])
    for _ in range(3):  # three nights; keep=2 prunes the oldest
        key = upload_database_dump(dump, backup_uri, keep=2, now=lambda: float(next(stamps)))
    assert list_database_dumps(backup_uri) == [
        "postgres/pixtrain-metadata-20231115T221320Z.dump",
        "postgres/pixtrain-metadata-20231116T221320Z.dump",
    ]
    assert key == list_database_dumps(backup_uri)[-1]

    restored_dump = fetch_database_dump(backup_uri, None, tmp_path / "restored.dump")
    target = _create_database(postgres_admin_url)
    try:
        subprocess.run(
            [
                pg_restore,
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                f"--dbname={_libpq(target)}",
                str(restored_dump),
            ],
            check=True,
            timeout=120,
        )
        with TrainingMetadataStore.from_url(target) as restored:
            assert restored.current_revision() == TrainingMetadataStore.head_revision()
            after = restored.lineage(sha), restored.lineage("file:///promoted/a2")
            assert after == before
            assert {t: restored.count_rows(t) for t in counts} == counts
            # The append-only audit trigger came back with the schema.
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                with restored.engine.begin() as conn:
                    conn.execute(sa.text("DELETE FROM audit_events"))
    finally:
        _drop_database(postgres_admin_url, target)

    # A damaged copy in the backup store is refused, not restored.
    damaged = Path(backup_uri) / key
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="does not match its recorded sha256"):
        fetch_database_dump(backup_uri, key, tmp_path / "again.dump")


def test_upload_refuses_something_that_is_not_a_dump(tmp_path):
    bogus = tmp_path / "empty.dump"
    bogus.write_bytes(b"")
    with pytest.raises(BackupError, match="missing or empty"):
        upload_database_dump(bogus, str(tmp_path / "b"))
    bogus.write_bytes(b"-- plain SQL\n")
    with pytest.raises(BackupError, match="custom-format"):
        upload_database_dump(bogus, str(tmp_path / "b"))
