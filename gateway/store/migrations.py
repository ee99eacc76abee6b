"""Versioned forward migrations, applied at open under a lock so concurrent starters migrate once.

The lock is a PostgreSQL transaction-level advisory lock, or SQLite's write
lock (BEGIN IMMEDIATE). `schema_version` holds one row per applied step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from . import schema
from .errors import StoreError

# Any constant unique to this application; pg_advisory_xact_lock takes a bigint.
_ADVISORY_LOCK_KEY = 0x6761746577617901   # "gateway" + 1


# Version 1 of the tables that later steps altered (step 3: properties.owner).
_V1 = sa.MetaData()
_V1_PROPERTIES = sa.Table(
    "properties", _V1,
    sa.Column("location", schema.Location, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


def _create_initial_tables(conn: sa.Connection) -> None:
    # Version 1 is schema.py as first released. When a later step alters one of
    # these tables, freeze its version-1 definition here (_V1). A step that only
    # adds an index may declare it in schema.py and create it with checkfirst:
    # step 1 then makes it on a new database.
    names = ("changes", "users", "admin_tokens", "locks", "failures", "bans",
             "quota_usage", "sessions", "revocations", "uploads", "nodes", "host_keys")
    schema.metadata.create_all(conn, tables=[schema.metadata.tables[n] for n in names])
    _V1.create_all(conn, tables=[_V1_PROPERTIES])
    conn.execute(sa.insert(schema.changes).values(id=1, counter=0))


def _index_lock_expiry(conn: sa.Connection) -> None:
    # Every LOCK deletes the expired locks first: without an index that scans
    # every lock held.
    index = next(i for i in schema.locks.indexes if i.name == "locks_expire")
    index.create(conn, checkfirst=True)


def _owners_and_folder_counts(conn: sa.Connection) -> None:
    # Locks are counted per user on every LOCK; properties get the user who set
    # them, for a per-user budget (rows from before belong to nobody: "").
    next(i for i in schema.locks.indexes if i.name == "locks_principal").create(conn, checkfirst=True)
    if "owner" not in {column["name"] for column in sa.inspect(conn).get_columns("properties")}:
        conn.execute(sa.text("ALTER TABLE properties ADD COLUMN owner TEXT NOT NULL DEFAULT ''"))
    next(i for i in schema.properties.indexes if i.name == "properties_owner").create(conn, checkfirst=True)
    # Folders count toward quota_files now: the stored counts (files only) are
    # dropped, and each user's home is counted again at its next use.
    conn.execute(sa.delete(schema.quota_usage))


# Step N (1-based) upgrades the schema from version N-1 to N. Append only.
STEPS: list[Callable[[sa.Connection], None]] = [
    _create_initial_tables,
    _index_lock_expiry,
    _owners_and_folder_counts,
]

LATEST = len(STEPS)


def current_version(conn: sa.Connection) -> int:
    """The highest applied version, 0 for an empty database."""
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    return conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar() or 0


def upgrade(engine: sa.Engine) -> int:
    """Apply every pending step in one transaction and return the schema version.

    Raises:
        StoreError: the database has a newer schema than this gateway knows.
        sqlalchemy.exc.SQLAlchemyError: the database failed.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
            version = current_version(conn)
            if version > LATEST:
                raise StoreError(f"the store's schema is version {version}, newer than this "
                                 f"gateway's ({LATEST}): upgrade the gateway")
            if version == LATEST:
                return version
            schema.schema_version.create(conn, checkfirst=True)
            for number in range(version + 1, LATEST + 1):
                STEPS[number - 1](conn)
                conn.execute(sa.insert(schema.schema_version).values(version=number, applied=time.time()))
            return LATEST
