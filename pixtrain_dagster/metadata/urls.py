"""Where the metadata database is: URL resolution from the environment, and safe descriptions of it.

Secrets are read from the environment when a store is built, never written to config, logs or errors. Every
function here returns or prints URLs with the password hidden unless it says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DATABASE_URL_ENV_VAR = "PIXTRAIN_METADATA_DATABASE_URL"
# Alternative to a whole URL (e.g. from a Kubernetes Secret holding only the password).
DB_HOST_ENV_VAR = "PIXTRAIN_DB_HOST"
DB_PORT_ENV_VAR = "PIXTRAIN_DB_PORT"
DB_USER_ENV_VAR = "PIXTRAIN_DB_USER"
DB_PASSWORD_ENV_VAR = "PIXTRAIN_DB_PASSWORD"
DB_NAME_ENV_VAR = "PIXTRAIN_DB_NAME"
DB_SSLMODE_ENV_VAR = "PIXTRAIN_DB_SSLMODE"
# CA bundle for sslmode verify-ca / verify-full (in the cluster: the pixtrain-db-ca ConfigMap, mounted read-only).
DB_SSLROOTCERT_ENV_VAR = "PIXTRAIN_DB_SSLROOTCERT"

POSTGRES_DRIVER = "postgresql+psycopg"  # psycopg 3
SQLITE_DRIVER = "sqlite+pysqlite"


def database_url_from_env(
    environ: Mapping[str, str] | None = None, url_env_var: str = DATABASE_URL_ENV_VAR
) -> URL | None:
    """The metadata database URL configured in the environment, or None (meaning: use embedded SQLite).

    ``$PIXTRAIN_METADATA_DATABASE_URL`` wins; otherwise a URL is assembled from ``PIXTRAIN_DB_HOST`` (required
    for this form), ``PIXTRAIN_DB_PORT`` (5432), ``PIXTRAIN_DB_USER`` (postgres), ``PIXTRAIN_DB_PASSWORD``,
    ``PIXTRAIN_DB_NAME`` (postgres), ``PIXTRAIN_DB_SSLMODE`` (libpq's default when unset) and
    ``PIXTRAIN_DB_SSLROOTCERT`` (CA file for verify-full).
    Returned as a ``URL`` object, whose str() and repr() mask the password.
    """
    environ = os.environ if environ is None else environ
    raw_url = environ.get(url_env_var, "").strip()
    if raw_url:
        return normalize_database_url(raw_url, source=f"${url_env_var}")
    host = environ.get(DB_HOST_ENV_VAR, "").strip()
    if not host:
        return None
    port_text = environ.get(DB_PORT_ENV_VAR, "").strip() or "5432"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"${DB_PORT_ENV_VAR} must be a port number, got {port_text!r}") from None
    sslmode = environ.get(DB_SSLMODE_ENV_VAR, "").strip()
    sslrootcert = environ.get(DB_SSLROOTCERT_ENV_VAR, "").strip()
    query = {"sslmode": sslmode} if sslmode else {}
    if sslrootcert:
        query["sslrootcert"] = sslrootcert
    return URL.create(
        POSTGRES_DRIVER,
        username=environ.get(DB_USER_ENV_VAR, "").strip() or "postgres",
        password=environ.get(DB_PASSWORD_ENV_VAR) or None,
        host=host,
        port=port,
        database=environ.get(DB_NAME_ENV_VAR, "").strip() or "postgres",
        query=query,
    )


def normalize_database_url(url: str | URL, source: str = "database URL") -> URL:
    """Parse ``url`` and pin the driver: any postgres URL runs on psycopg 3, any sqlite URL on pysqlite.

    Parse errors never echo the string: it may hold a password.
    """
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):  # ValueError: e.g. a non-numeric port
            raise ValueError(
                f"{source} is not a valid database URL "
                "(expected postgresql://USER:PASSWORD@HOST:PORT/DBNAME; value not shown, it may hold a password)"
            ) from None
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername=POSTGRES_DRIVER)
    if backend == "sqlite":
        return url.set(drivername=SQLITE_DRIVER)
    raise ValueError(f"{source} must be a postgresql:// or sqlite:// URL, got scheme {url.drivername!r}")


def describe_database(url: URL) -> str:
    """``postgresql://HOST:PORT/DBNAME`` (or the SQLite file path) for messages: no user, no password."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite file {url.database}"
    return f"postgresql://{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
