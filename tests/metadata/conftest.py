"""Real PostgreSQL for the metadata-store tests (never a mock), one fresh database per test.

Where the server comes from, in order:
1. ``$PIXTRAIN_TEST_DATABASE_URL`` (CI: ``postgresql://postgres@127.0.0.1:5432/postgres``), a role allowed to
   CREATE DATABASE (one ``pixtrain_test_*`` database per session, plus one per test that needs a whole one);
2. a throwaway server started from the local PostgreSQL binaries (``/usr/lib/postgresql/*/bin`` or ``initdb`` on
   PATH) in a temporary folder, stopped and deleted at the end of the session. PostgreSQL refuses to run as
   root, so under root it runs as the ``postgres`` OS user;
3. otherwise the Postgres tests FAIL (not skip) with instructions.

Isolation: each test gets its own schema (``postgres_url``) or, where it needs one, its own database
(``postgres_database_url``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from pixtrain_dagster.metadata import TrainingMetadataStore, normalize_database_url

from . import metadata_samples

TEST_DATABASE_URL_ENV_VAR = "PIXTRAIN_TEST_DATABASE_URL"

HOW_TO_GET_POSTGRES = f"""
These tests need a real PostgreSQL server (they never mock it). Either
  * export {TEST_DATABASE_URL_ENV_VAR}=postgresql://USER[:PASSWORD]@HOST:PORT/postgres
    (a role allowed to CREATE DATABASE; the tests create and drop their own pixtrain_test_* databases), or
  * install the server binaries so a throwaway server can be started: `apt-get install postgresql`
    (Debian/Ubuntu, gives /usr/lib/postgresql/*/bin/initdb) or `brew install postgresql`
    (initdb on PATH). Under root the `postgres` OS user must exist (the Debian package creates it).
"""


class PostgresNotAvailable(RuntimeError):
    pass


def _admin_engine(url: URL) -> sa.Engine:
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


def _check_reachable(url: URL) -> None:
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find_initdb() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)  # newest major first
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(on_path)
    return Path(candidates[0]) if candidates else None


class ThrowawayPostgres:
    """initdb + pg_ctl in a temporary folder; trust auth on 127.0.0.1 only, fsync off (test data)."""

    def __init__(self) -> None:
        initdb = _find_initdb()
        if initdb is None:
            raise PostgresNotAvailable("no PostgreSQL server binaries (initdb) found")
        self.bin_dir = initdb.parent
        self.run_as: list[str] = []
        self.owner_uid: int | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotAvailable(
                    "running as root and there is no `postgres` OS user to run the server"
                ) from None
            if shutil.which("runuser") is None:
                raise PostgresNotAvailable("running as root and `runuser` is missing (needed to drop to `postgres`)")
            self.run_as = ["runuser", "-u", "postgres", "--"]
            self.owner_uid, self.owner_gid = owner.pw_uid, owner.pw_gid
        # Not under pytest's tmp dir: that is mode 0700 and owned by root, so `postgres` could not enter it.
        self.base_dir = Path(tempfile.mkdtemp(prefix="pixtrain-test-pg-"))
        self.data_dir = self.base_dir / "data"
        self.port = _free_port()
        if self.owner_uid is not None:
            os.chown(self.base_dir, self.owner_uid, self.owner_gid)

    def _run(self, *args: str, timeout: float) -> None:
        result = subprocess.run(
            [*self.run_as, *args], capture_output=True, text=True, timeout=timeout, cwd=self.base_dir
        )
        if result.returncode != 0:
            raise PostgresNotAvailable(f"{' '.join(args[:1])} failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> URL:
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", timeout=120,
        )  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"),
            "-o", options, "-w", "-t", "60", "start", timeout=90,
        )  # fmt: skip
        return URL.create(
            "postgresql+psycopg", username="postgres", host="127.0.0.1", port=self.port, database="postgres"
        )

    def stop(self, missing_ok: bool = False) -> None:
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", timeout=60,
            )  # fmt: skip
        except (PostgresNotAvailable, subprocess.TimeoutExpired):
            if not missing_ok:
                raise
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[URL]:
    """URL of a role that may CREATE DATABASE on a real server (see the module docstring)."""
    configured = os.environ.get(TEST_DATABASE_URL_ENV_VAR, "").strip()
    if configured:
        url = normalize_database_url(configured, source=f"${TEST_DATABASE_URL_ENV_VAR}")
        try:
            _check_reachable(url)
        except sa.exc.OperationalError as exc:
            pytest.fail(
                f"${TEST_DATABASE_URL_ENV_VAR} points at {url.host}:{url.port}, which is not reachable: "
                f"{' '.join(str(exc.orig).split())}\n{HOW_TO_GET_POSTGRES}",
                pytrace=False,
            )
        yield url
        return
    try:
        server = ThrowawayPostgres()
    except (PostgresNotAvailable, OSError) as exc:
        pytest.fail(f"No PostgreSQL for the tests: {exc}\n{HOW_TO_GET_POSTGRES}", pytrace=False)
    try:
        url = server.start()
    except (PostgresNotAvailable, OSError, subprocess.TimeoutExpired) as exc:
        server.stop(missing_ok=True)
        pytest.fail(f"No PostgreSQL for the tests: {exc}\n{HOW_TO_GET_POSTGRES}", pytrace=False)
    try:
        yield url
    finally:
        server.stop()


def _create_database(admin_url: URL) -> URL:
    name = f"pixtrain_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(admin_url)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return admin_url.set(database=name)


def _drop_database(admin_url: URL, url: URL) -> None:
    admin = _admin_engine(admin_url)
    try:
        with admin.connect() as conn:
            # FORCE: a test that failed half-way may leave connections open.
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def postgres_database_url(postgres_admin_url: URL) -> Iterator[URL]:
    """A fresh database for this test only (``pixtrain_test_<uuid>``), dropped afterwards.

    For tests that need a whole database (Dagster's storage, ALTER DATABASE); others use ``postgres_url``.
    """
    url = _create_database(postgres_admin_url)
    try:
        yield url
    finally:
        _drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def _postgres_session_database(postgres_admin_url: URL) -> Iterator[URL]:
    url = _create_database(postgres_admin_url)
    try:
        yield url
    finally:
        _drop_database(postgres_admin_url, url)


@pytest.fixture
def postgres_url(_postgres_session_database: URL) -> Iterator[URL]:
    """A fresh, empty schema for this test only, as the connection's search_path; dropped afterwards.

    A schema costs milliseconds where CREATE DATABASE costs up to a second; it isolates everything the store
    creates (tables, view, trigger function, Alembic version table).
    """
    schema_name = f"test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(_postgres_session_database)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema_name}"')
    try:
        yield _postgres_session_database.update_query_dict({"options": f"-csearch_path={schema_name}"})
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema_name}" CASCADE')
        admin.dispose()


@pytest.fixture
def postgres_store(postgres_url: URL) -> Iterator[TrainingMetadataStore]:
    """An unmigrated store on a fresh Postgres database."""
    store = TrainingMetadataStore.from_url(postgres_url, connect_timeout_s=5)
    yield store
    store.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[TrainingMetadataStore]:
    """An unmigrated store on a fresh SQLite file (the no-database-configured fallback)."""
    store = TrainingMetadataStore.from_url(None, sqlite_path=tmp_path / "dagster_home" / "pixtrain_metadata.sqlite")
    yield store
    store.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest) -> TrainingMetadataStore:
    """An unmigrated store on each backend in turn: both must behave the same."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def migrated_store(store: TrainingMetadataStore) -> TrainingMetadataStore:
    store.migrate()
    return store


@pytest.fixture
def record_training():
    """``record_training(store, run_id, ...) -> (adapter_sha256, adapter_uri)``: one training step's writes."""
    return metadata_samples.record_training
