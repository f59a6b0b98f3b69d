"""Least privilege on the metadata database: an owner role migrates, the pipeline only reads and appends.

Two roles on PostgreSQL:

* the **owner** (e.g. ``pixtrain_owner``) owns the schema, the tables, the view and the trigger function. Only
  ``python -m pixtrain_dagster.cli db-migrate`` connects as it (a Helm hook Job in the cluster), never a step;
* the **writer** group role (``NOLOGIN``, default ``pixtrain_writer``, ``$PIXTRAIN_DB_WRITER_ROLE``) holds what
  the store's methods need and nothing else: ``SELECT, INSERT`` on ``audit_events`` and ``dataset_versions``
  (insert-or-ignore), ``SELECT, INSERT, UPDATE`` on ``training_runs``, ``checkpoints`` and ``evaluations``
  (upserts), ``SELECT`` on the view and the Alembic version table, ``USAGE`` on the id sequences and the
  schema. No ``CREATE`` on the schema, no ``UPDATE``/``DELETE``/``TRUNCATE`` on the audit log, not an owner, so
  no DDL: it cannot alter or drop a table, disable the append-only trigger or replace its function.
  The pipeline's login role (``PIXTRAIN_DB_USER``, e.g. ``pixtrain``) is a member of the writer role.

``apply_grants`` re-applies the whole set after every migration (idempotent: it revokes first, so a privilege
removed here disappears from existing databases too). Creating a role needs ``CREATEROLE``, which a managed
server's owner role usually lacks: then the DBA runs :func:`dba_setup_sql` once and ``db-migrate`` only grants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pixtrain_dagster.metadata.schema import VERSION_TABLE

WRITER_ROLE_ENV_VAR = "PIXTRAIN_DB_WRITER_ROLE"
DEFAULT_WRITER_ROLE = "pixtrain_writer"

# What each store method needs; nothing more (tests/metadata/test_metadata_roles.py proves both directions).
TABLE_PRIVILEGES: Mapping[str, tuple[str, ...]] = {
    "dataset_versions": ("SELECT", "INSERT"),
    "training_runs": ("SELECT", "INSERT", "UPDATE"),
    "checkpoints": ("SELECT", "INSERT", "UPDATE"),
    "evaluations": ("SELECT", "INSERT", "UPDATE"),
    "audit_events": ("SELECT", "INSERT"),
    "adapter_lineage": ("SELECT",),
    VERSION_TABLE: ("SELECT",),
}
SEQUENCE_TABLES = ("training_runs", "checkpoints", "evaluations", "audit_events")

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class RoleSetupError(RuntimeError):
    """The writer role is missing (and could not be created) or a role name is unusable."""


def check_role_name(role: str) -> str:
    if not _ROLE_NAME.match(role):
        raise RoleSetupError(
            f"role name {role!r} must be lower-case letters, digits and _ (max 63), e.g. {DEFAULT_WRITER_ROLE}"
        )
    return role


def dba_setup_sql(
    writer_role: str,
    login_role: str,
    owner_role: str,
    database: str,
    schema: str = "pixtrain",
) -> str:
    """One-time SQL for a DBA (a role with CREATEROLE): the roles, the schema and the database privileges."""
    for name in (writer_role, login_role, owner_role, schema):
        check_role_name(name)
    return f"""-- Run once as a role with CREATEROLE (e.g. the managed server's admin). Passwords: set with \\password.
CREATE ROLE {owner_role} LOGIN;                          -- owns the schema; used only by db-migrate
CREATE ROLE {writer_role} NOLOGIN;                       -- privileges of the pipeline, granted by db-migrate
CREATE ROLE {login_role} LOGIN IN ROLE {writer_role};   -- what the pipeline pods connect as
REVOKE ALL ON DATABASE "{database}" FROM PUBLIC;         -- no TEMP tables or connections for other roles
GRANT CONNECT ON DATABASE "{database}" TO {owner_role}, {writer_role};
GRANT {owner_role} TO CURRENT_USER;                       -- PostgreSQL 16+: needed to create the schema for it
CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner_role};
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
ALTER ROLE {owner_role} IN DATABASE "{database}" SET search_path = {schema};
ALTER ROLE {login_role} IN DATABASE "{database}" SET search_path = {schema};
-- Then, as {owner_role}: python -m pixtrain_dagster.cli db-migrate --writer-role {writer_role}
"""


def role_exists(conn: Connection, role: str) -> bool:
    return conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is not None


def ensure_writer_role(conn: Connection, role: str, *, create: bool) -> bool:
    """Make sure the writer role exists; returns True when it was created here (needs CREATEROLE)."""
    check_role_name(role)
    if role_exists(conn, role):
        return False
    if not create:
        raise RoleSetupError(
            f"database role {role!r} does not exist. A DBA creates it once (CREATE ROLE {role} NOLOGIN; "
            f"GRANT {role} TO <pipeline login role>; see `python -m pixtrain_dagster.cli db-setup-sql`), or run "
            "db-migrate with --create-role as an owner that has CREATEROLE"
        )
    can_create = conn.execute(
        sa.text("SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user")
    ).scalar_one()
    if not can_create:
        raise RoleSetupError(
            f"database role {role!r} does not exist and the migrating role cannot create it (no CREATEROLE). "
            "Ask a DBA to run the SQL printed by `python -m pixtrain_dagster.cli db-setup-sql`"
        )
    conn.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN")
    return True


def grant_statements(conn: Connection, writer_role: str) -> list[str]:
    """The statements that give ``writer_role`` exactly TABLE_PRIVILEGES in the connection's current schema."""
    check_role_name(writer_role)
    schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    quote = conn.dialect.identifier_preparer.quote
    statements = [f"GRANT USAGE ON SCHEMA {quote(schema)} TO {writer_role}"]
    for table, privileges in TABLE_PRIVILEGES.items():
        name = f"{quote(schema)}.{quote(table)}"
        statements.append(f"REVOKE ALL ON {name} FROM {writer_role}")
        statements.append(f"GRANT {', '.join(privileges)} ON {name} TO {writer_role}")
    for table in SEQUENCE_TABLES:
        sequence = conn.execute(
            sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": f"{quote(schema)}.{quote(table)}"}
        ).scalar_one()
        if sequence:
            statements.append(f"REVOKE ALL ON SEQUENCE {sequence} FROM {writer_role}")
            statements.append(f"GRANT USAGE ON SEQUENCE {sequence} TO {writer_role}")
    # The trigger fires for everyone without EXECUTE; nobody needs to call the function directly.
    statements.append(f"REVOKE ALL ON FUNCTION {quote(schema)}.pixtrain_reject_audit_event_change() FROM PUBLIC")
    return statements


def apply_grants(conn: Connection, writer_role: str, *, create_role: bool = False) -> list[str]:
    """Ensure the writer role and (re-)apply its privileges; returns the statements run. PostgreSQL only."""
    if conn.dialect.name != "postgresql":
        raise RoleSetupError("database roles exist on PostgreSQL only; the SQLite fallback is a local file")
    ensure_writer_role(conn, writer_role, create=create_role)
    statements = grant_statements(conn, writer_role)
    for statement in statements:
        conn.exec_driver_sql(statement)
    return statements


def least_privilege_problems(conn: Connection) -> list[str]:
    """Why the connected role is more powerful than the pipeline should be (empty when it is not)."""
    if conn.dialect.name != "postgresql":
        return []
    row = (
        conn.execute(
            sa.text(
                "SELECT r.rolsuper, r.rolcreaterole, r.rolbypassrls, "
                "       pg_has_role(current_user, c.relowner, 'USAGE') AS owns_audit, "
                "       has_schema_privilege(current_schema(), 'CREATE') AS can_create, "
                "       has_table_privilege(c.oid, 'UPDATE') OR has_table_privilege(c.oid, 'DELETE') "
                "         OR has_table_privilege(c.oid, 'TRUNCATE') AS can_rewrite "
                "FROM pg_roles r, pg_class c "
                "WHERE r.rolname = current_user AND c.oid = to_regclass('audit_events')"
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return ["audit_events does not exist: run db-migrate as the owner role first"]
    problems = []
    if row["rolsuper"]:
        problems.append("connected as a superuser")
    if row["rolcreaterole"]:
        problems.append("the role has CREATEROLE")
    if row["owns_audit"]:
        problems.append("the role owns (or is a member of the owner of) audit_events, so it could run DDL on it")
    if row["can_create"]:
        problems.append("the role may CREATE in the schema")
    if row["can_rewrite"]:
        problems.append("the role holds UPDATE, DELETE or TRUNCATE on audit_events")
    return problems
