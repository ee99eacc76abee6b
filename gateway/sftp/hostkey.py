"""SSH host keys: ed25519 and RSA 3072, generated once and reused.

Clients pin a server by its host key, so the keys must survive restarts, and
every node behind one address must show the same keys. With a shared store
(PostgreSQL) the keys live in the store: the first node stores them (its key
files in the state dir if it has any, so pinned keys survive the move to
several nodes) and every other node reads them. Otherwise they are files in
the state dir, written with mode 0600 and never regenerated while one exists.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..store import Store

log = logging.getLogger(__name__)

RSA_BITS = 3072
_KEYS = (
    ("ssh_host_ed25519_key", paramiko.Ed25519Key, lambda: ed25519.Ed25519PrivateKey.generate()),
    ("ssh_host_rsa_key", paramiko.RSAKey,
     lambda: rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)),
)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a fresh file at `path` atomically; an existing file wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # link() fails if another process created the key first: keep theirs.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _new_pem(generate) -> bytes:
    return generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())


def load_host_keys(state_dir: Path, store: Store | None = None) -> list[paramiko.PKey]:
    """Return the host keys (ed25519 first), generating any that are missing.

    With a shared `store`, the keys come from it (see the module docstring).

    Raises:
        OSError: the state dir cannot be written or a key file cannot be read.
        paramiko.SSHException: a key file exists but is not a valid private key.
        StoreUnavailable: the shared store cannot be reached.
    """
    if store is not None and store.shared:
        return [_shared_key(state_dir / name, key_class, generate, store)
                for name, key_class, generate in _KEYS]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = []
    for name, key_class, generate in _KEYS:
        path = state_dir / name
        if not path.exists():
            private = generate()
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
            public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH)
            _write_new(path, pem, 0o600)
            with contextlib.suppress(FileExistsError):
                _write_new(path.with_name(name + ".pub"), public + b" gateway\n", 0o644)
            log.info("generated SSH host key %s", path)
        keys.append(key_class.from_private_key_file(str(path)))
    return keys


def _shared_key(path: Path, key_class: type[paramiko.PKey], generate, store: Store) -> paramiko.PKey:
    def first() -> str:
        # This node's existing key, if any, becomes every node's key.
        if path.exists():
            log.info("storing SSH host key %s in the shared store", path)
            return path.read_text()
        log.info("generated SSH host key %s in the shared store", path.name)
        return _new_pem(generate).decode()

    pem = store.get_or_create_host_key(path.name, first)
    return key_class.from_private_key(io.StringIO(pem))


def describe(key: paramiko.PKey) -> str:
    """One line as `ssh-keygen -l` prints it: bits, SHA256 fingerprint, type."""
    return f"{key.get_bits()} {key.fingerprint} ({key.get_name().removeprefix('ssh-').upper()})"
