"""This process's node id: what the store records as the owner of sessions and uploads in flight."""
from __future__ import annotations

import os
import secrets
import socket

_ids: dict[int, str] = {}


def node_id() -> str:
    """"HOST:PID:RANDOM", unique per process and stable for its life.

    A worker forked from a parent gets its own id (the pid differs, and the
    random part tells apart a pid that the host reused after a restart).
    """
    pid = os.getpid()
    if pid not in _ids:
        _ids[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    return _ids[pid]
