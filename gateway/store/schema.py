"""The store's tables, at the latest schema version (SQLAlchemy Core)."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Storage locations ("backend:/path") are compared by byte order so that
# "everything below X" is one indexed range query. SQLite's default collation
# is bytewise already; PostgreSQL's depends on the database locale, so pin "C".
Location = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied", sa.Float, nullable=False),
)

# One row (id 1): bumped in the same transaction as every change that other
# processes cache (users, tokens, bans, revocations).
changes = sa.Table(
    "changes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("counter", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("password_hash", sa.Text),
    sa.Column("keys", sa.Text, nullable=False),          # JSON list of public key lines
    sa.Column("home", sa.Text, nullable=False),          # "backend:/path"
    sa.Column("mounts", sa.Text, nullable=False),        # JSON, the users file's mounts table
    sa.Column("permissions", sa.Text, nullable=False),   # JSON, the users file's permissions table
    sa.Column("quota_bytes", sa.BigInteger, nullable=False),
    sa.Column("quota_files", sa.BigInteger, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

admin_tokens = sa.Table(
    "admin_tokens", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
)

locks = sa.Table(
    "locks", metadata,
    sa.Column("token", sa.Text, primary_key=True),
    sa.Column("root", Location, nullable=False, index=True),
    sa.Column("owner", sa.LargeBinary, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),         # "exclusive" or "shared"
    sa.Column("depth", sa.Text, nullable=False),         # "0" or "infinity"
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("timeout", sa.Float, nullable=False),
    sa.Column("expire", sa.Float, nullable=False),
    # Every LOCK first deletes the expired locks (schema version 2), and
    # counts the locks its user holds (version 3).
    sa.Index("locks_expire", "expire"),
    sa.Index("locks_principal", "principal"),
)

properties = sa.Table(
    "properties", metadata,
    sa.Column("location", Location, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    # The user who set it (schema version 3; "" before): each user's properties
    # have a budget in bytes. Not a foreign key: a removed user's rows stay with
    # the files they describe.
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Index("properties_owner", "owner"),
)

failures = sa.Table(
    "failures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Index("failures_key_time", "key", "time"),
)

bans = sa.Table(
    "bans", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("until", sa.Float, nullable=False),
)

quota_usage = sa.Table(
    "quota_usage", metadata,
    sa.Column("user", sa.Text, sa.ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("files", sa.BigInteger, nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("user", sa.Text, nullable=False, index=True),
    sa.Column("protocol", sa.Text, nullable=False),
    sa.Column("ip", sa.Text, nullable=False),
    sa.Column("node", sa.Text, nullable=False, index=True),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("touched", sa.Float, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)

revocations = sa.Table(
    "revocations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user", sa.Text),
    sa.Column("session_id", sa.Text),
    sa.Column("time", sa.Float, nullable=False),
)

uploads = sa.Table(
    "uploads", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("node", sa.Text, nullable=False, index=True),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("upload_id", sa.Text, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
)

nodes = sa.Table(
    "nodes", metadata,
    sa.Column("node", sa.Text, primary_key=True),
    sa.Column("heartbeat", sa.Float, nullable=False),
)

host_keys = sa.Table(
    "host_keys", metadata,
    sa.Column("type", sa.Text, primary_key=True),
    sa.Column("private_key", sa.Text, nullable=False),   # PEM (OpenSSH format)
)
