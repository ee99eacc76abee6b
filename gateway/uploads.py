"""Uploads in flight, recorded in the store under this node, and the node's heartbeat.

Every node records each upload it has open (the backend, the storage path
and the backend's id for it: a local temp file, an S3 multipart upload) and
beats its heartbeat every few seconds. Every node also sweeps: an upload
whose node has been silent for `[store] node_timeout` belongs to a node that
died, so its leftovers are removed from the backend (the previous version of
the file stays) and its record dropped.
"""
from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Mapping

from .errors import GatewayError, InvalidPath
from .storage.base import Backend, Upload
from .store import InFlightUpload, Store, StoreError

log = logging.getLogger(__name__)


def heartbeat_interval(node_timeout: float) -> float:
    """Seconds between heartbeats: several per node_timeout, so one late beat is no death."""
    return max(0.2, min(5.0, node_timeout / 4))


class InFlightUploads:
    """This node's uploads as recorded in the store.

    The store being unreachable never fails an upload: the record is only
    what lets another node clean up after a crash (and S3's own sweep of
    old multipart uploads, `abandoned_upload_age`, still catches those).
    """

    def __init__(self, store: Store, node: str, backends: Mapping[str, Backend]) -> None:
        self._store = store
        self.node = node
        self._names = {id(backend): name for name, backend in backends.items()}

    def register(self, backend: Backend, path: str, upload: Upload) -> str | None:
        """Record `upload` of `path`; returns the record's id for `forget`."""
        name = self._names.get(id(backend))
        if name is None:
            return None
        record = InFlightUpload(secrets.token_hex(12), self.node, name, path, upload.backend_id or "",
                                time.time())

        def backend_id_known(backend_id: str) -> None:
            # The multipart upload started after open: record its id in place of the empty one.
            self._write(record.id, InFlightUpload(record.id, record.node, record.backend, record.path,
                                                  backend_id, record.started))

        upload.on_backend_id = backend_id_known
        self._write(None, record)
        return record.id

    def forget(self, record_id: str) -> None:
        """Drop the record of an upload that was committed or aborted."""
        self._write(record_id, None)

    def _write(self, remove: str | None, add: InFlightUpload | None) -> None:
        try:
            if remove is not None:
                self._store.remove_upload(remove)
            if add is not None:
                self._store.add_upload(add)
        except StoreError as exc:
            log.warning("could not record an upload in flight in the store: %s", exc)


class NodeKeeper:
    """One thread: this node's heartbeat, and the sweep of dead nodes' uploads."""

    def __init__(self, store: Store, node: str, backends: Mapping[str, Backend], *,
                 node_timeout: float, sweep_interval: float) -> None:
        self._store = store
        self.node = node
        self._backends = backends
        self.node_timeout = node_timeout
        self.sweep_interval = sweep_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Beat once now (before any upload is recorded under this node), then keep beating."""
        self._store.heartbeat(self.node)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="node-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and forget this node (its uploads were aborted or committed by now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                self._store.forget_node(self.node)
            except StoreError as exc:
                log.warning("could not remove node %s from the store: %s", self.node, exc)

    def _run(self) -> None:
        beat = heartbeat_interval(self.node_timeout)
        next_beat = time.monotonic() + beat
        next_sweep = time.monotonic() + self._jittered()
        while not self._stop.wait(max(0.0, min(next_beat, next_sweep) - time.monotonic())):
            now = time.monotonic()
            try:
                if now >= next_beat:
                    self._store.heartbeat(self.node)
                    next_beat = now + beat
                if now >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self._jittered()
            except StoreError as exc:
                log.warning("node %s: %s", self.node, exc)
                next_beat = next_sweep = time.monotonic() + beat
            except Exception:
                log.exception("node %s: heartbeat or sweep failed", self.node)
                next_sweep = time.monotonic() + self._jittered()

    def _jittered(self) -> float:
        # Nodes started together should not all sweep at the same moment.
        return self.sweep_interval * random.uniform(0.8, 1.2)

    def sweep(self) -> int:
        """Abort the uploads of nodes silent for node_timeout; returns how many were removed."""
        removed = 0
        for upload in self._store.stale_uploads(self.node_timeout):
            if self._stop.is_set():
                break
            backend = self._backends.get(upload.backend)
            if backend is not None and upload.upload_id:
                try:
                    backend.abort_stale_upload(upload.path, upload.upload_id)
                except InvalidPath as exc:
                    log.warning("dropping the record of upload %s of node %s: %s", upload.id, upload.node, exc)
                except GatewayError as exc:
                    # Kept: the next sweep (here or on another node) tries again.
                    log.warning("could not abort upload %s of dead node %s: %s", upload.upload_id,
                                upload.node, exc)
                    continue
            elif backend is None:
                # A backend this node does not have (configs differ): another node may.
                continue
            self._store.remove_upload(upload.id)
            removed += 1
            log.info("aborted the upload of %s:%s left by node %s (silent for over %ss)",
                     upload.backend, upload.path, upload.node, self.node_timeout)
        return removed
