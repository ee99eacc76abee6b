"""SFTP front-end: a paramiko SSH server whose SFTP subsystem serves each user's UserFS."""
from __future__ import annotations

from .listener import SFTPFrontEnd


def create_server(gateway) -> SFTPFrontEnd:
    """The `sftp` front-end for a Gateway; start() binds and serves in background threads."""
    return SFTPFrontEnd(gateway)


__all__ = ["SFTPFrontEnd", "create_server"]
