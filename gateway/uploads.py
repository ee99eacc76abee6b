"""Uploads in flight, recorded in the store under this node, and the node's heartbeat.

Every node records each upload it has open that a crash would leave behind
for long (the backend, the storage path and the backend's id for it: a local
temp file, an S3 multipart upload; see RECORD_AFTER for which and when) and
beats its heartbeat every few seconds. Every node also sweeps: an upload
whose node has been silent for `[store] node_timeout` belongs to a node that
died, so its leftovers are removed from the backend (the previous version of
the file stays) and its record dropped; that node's sessions and its row go too.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

from .errors import GatewayError, InvalidPath
from .storage.base import Backend, Upload
from .store import InFlightUpload, Store, StoreError

log = logging.getLogger(__name__)


def heartbeat_interval(node_timeout: float) -> float:
    """Seconds between heartbeats: several per node_timeout, so one late beat is no death.

    At most RECORD_AFTER too: uploads are recorded on the beat.
    """
    return max(0.2, min(RECORD_AFTER, node_timeout / 4))


# When an upload is written to the store. Most uploads are small files that
# end within milliseconds: writing a record and deleting it again cost two
# store transactions per file, about half of a small PUT's store time, to
# guard against a crash in those milliseconds. What such a crash leaves costs
# little and is swept anyway: a local temp file is removed by the start-up
# sweep of any node on that storage (and a restarted node sweeps its own).
# So an upload whose storage holds something from the start (a local temp
# file) is recorded only once it has run RECORD_AFTER seconds (by the
# keeper, on its next beat) or has written RECORD_BYTES, whichever comes
# first: a node that dies leaves at most a few seconds' or RECORD_BYTES'
# worth of temp file unrecorded. An upload that gets its backend id later
# (S3 starts its multipart upload at the first full part) is recorded at that
# moment: a multipart upload is billed and invisible until aborted, and that
# moment comes with a part upload of several MiB, beside which one store
# write is noise. An upload without a backend id (an S3 upload still in
# memory or in an unlinked spool file) leaves nothing behind and is never
# recorded.
RECORD_AFTER = 2.0
RECORD_BYTES = 8 * 1024 * 1024


class _Entry:
    """One upload of this node: its record, and whether the store has it."""

    __slots__ = ("record", "born", "stored", "ended", "lock")

    def __init__(self, record: InFlightUpload) -> None:
        self.record = record
        self.born = time.monotonic()
        self.stored = False
        self.ended = False
        # Held across this record's store writes, so that an upload ending
        # meanwhile removes the record after it is written, never before.
        self.lock = threading.Lock()


class UploadJournal:
    """A worker's list of the uploads it has not recorded in the store yet, in a file its supervisor can see.

    An upload younger than RECORD_AFTER and smaller than RECORD_BYTES is not
    in the store, so no sweep would find its temp file if the worker were
    killed. Appending one line per upload costs one write(2), no fsync: the
    page cache survives the process (a crashed host is the start-up sweep's
    job). When the supervisor reaps a worker that died, it marks the worker's
    journal dead (`mark_dead`); any worker's keeper then removes what it lists
    (`InFlightUploads.sweep_dead_journals`).
    """

    # Rewritten with only the live uploads once it holds this many lines.
    COMPACT_AFTER = 4096

    def __init__(self, directory: Path, pid: int) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / f"{pid}.journal"
        self._lock = threading.Lock()
        self._live: dict[str, InFlightUpload] = {}
        self._lines = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                           0o600)

    def add(self, record: InFlightUpload) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._lines >= self.COMPACT_AFTER:
                self._compact()
            self._live[record.id] = record
            os.write(self._fd, _line(record))
            self._lines += 1

    def drop(self, record_id: str) -> None:
        """The upload ended (or is in the store now): the journal need not name it any more."""
        with self._lock:
            self._live.pop(record_id, None)

    def _compact(self) -> None:
        fresh = self.path.with_suffix(".compacting")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(_line(r) for r in self._live.values()))
            os.replace(fresh, self.path)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        self._lines = len(self._live)

    def close(self) -> None:
        """A clean stop: every upload was committed or aborted, nothing is left to clean."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self.path.unlink(missing_ok=True)

    @staticmethod
    def mark_dead(directory: Path, pid: int) -> None:
        """Called by the supervisor for a worker that died: its journal is now for others to clean."""
        try:
            os.rename(directory / f"{pid}.journal", directory / f"{pid}.dead")
        except FileNotFoundError:
            pass


def _line(record: InFlightUpload) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode() + b"\n"


class InFlightUploads:
    """This node's uploads, recorded in the store once they may leave something behind.

    The store being unreachable never fails an upload: the record is only
    what lets another node clean up after a crash (and S3's own sweep of
    old multipart uploads, `abandoned_upload_age`, still catches those).
    """

    def __init__(self, store: Store, node: str, backends: Mapping[str, Backend],
                 journal_dir: Path | None = None) -> None:
        self._store = store
        self.journal_dir = journal_dir
        self.node = node
        self._names = {id(backend): name for name, backend in backends.items()}
        self._backends = backends
        self._entries: dict[str, _Entry] = {}
        self.journal: UploadJournal | None = None

    def register(self, backend: Backend, path: str, upload: Upload) -> str | None:
        """Track `upload` of `path` (recorded in the store later, see RECORD_AFTER); returns its id for `forget`."""
        name = self._names.get(id(backend))
        if name is None:
            return None
        entry = _Entry(InFlightUpload(secrets.token_hex(12), self.node, name, path, upload.backend_id or "",
                                      time.time()))
        record_id = entry.record.id
        self._entries[record_id] = entry
        if self.journal is not None and entry.record.upload_id:
            # Not in the store before RECORD_AFTER or RECORD_BYTES: the journal covers that time.
            self.journal.add(entry.record)

        def backend_id_known(backend_id: str) -> None:
            # The backend started something that outlives a crash (an S3 multipart upload): record it now.
            self._record(entry, backend_id)

        upload.on_backend_id = backend_id_known
        return record_id

    def grown(self, record_id: str, size: int) -> None:
        """The upload has `size` bytes of content: record it if that passes RECORD_BYTES."""
        if size >= RECORD_BYTES:
            entry = self._entries.get(record_id)
            if entry is not None and not entry.stored:
                self._record(entry)

    def record_due(self, age: float | None = None) -> int:
        """Record the uploads running for `age` seconds (default RECORD_AFTER); returns how many.

        Called by the NodeKeeper on every beat.
        """
        age = RECORD_AFTER if age is None else age
        now = time.monotonic()
        recorded = 0
        for entry in list(self._entries.values()):
            if not entry.stored and entry.record.upload_id and now - entry.born >= age:
                self._record(entry)
                recorded += entry.stored
        return recorded

    def forget(self, record_id: str) -> None:
        """The upload was committed or aborted: drop its record if the store has it."""
        entry = self._entries.pop(record_id, None)
        if entry is None:
            return
        if self.journal is not None:
            self.journal.drop(record_id)
        with entry.lock:
            entry.ended = True
            if entry.stored:
                self._write(record_id, None)

    def open_journal(self, pid: int) -> None:
        """Keep a journal (see UploadJournal): this process is a worker its supervisor may reap."""
        if self.journal_dir is not None:
            self.journal = UploadJournal(self.journal_dir, pid)

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def sweep_dead_journals(self) -> int:
        """Remove the temp files of uploads listed in dead workers' journals; returns how many were looked at."""
        if self.journal_dir is None:
            return 0
        checked = 0
        try:
            dead = sorted(self.journal_dir.glob("*.dead"))
        except OSError:
            return 0
        for path in dead:
            claimed = path.with_suffix(f".claimed-{os.getpid()}")
            try:
                os.rename(path, claimed)        # one worker takes each journal
            except FileNotFoundError:
                continue
            for line in claimed.read_bytes().splitlines():
                try:
                    record = InFlightUpload(**json.loads(line))
                except (ValueError, TypeError):
                    continue        # a line cut short by the kill
                backend = self._backends.get(record.backend)
                if backend is None or not record.upload_id:
                    continue
                try:
                    # Most were committed or aborted before the death: removing those finds nothing.
                    backend.abort_stale_upload(record.path, record.upload_id)
                    checked += 1
                except GatewayError as exc:
                    log.warning("could not remove the upload %r of %r left by a dead worker: %s",
                                record.upload_id, record.path, exc)
            claimed.unlink(missing_ok=True)
            log.info("removed what the uploads in flight of a dead worker left (%s)", path.name)
        return checked

    def _record(self, entry: _Entry, backend_id: str | None = None) -> None:
        with entry.lock:
            if entry.ended:
                return
            old = entry.record.id if entry.stored else None
            if backend_id is not None:
                # The multipart upload started after open: record its id in place of the empty one.
                entry.record = replace(entry.record, upload_id=backend_id)
            elif entry.stored or not entry.record.upload_id:
                return
            entry.stored = self._write(old, entry.record) or entry.stored

    def _write(self, remove: str | None, add: InFlightUpload | None) -> bool:
        try:
            if remove is not None:
                self._store.remove_upload(remove)
            if add is not None:
                self._store.add_upload(add)
        except StoreError as exc:
            log.warning("could not record an upload in flight in the store: %s", exc)
            return False
        return True


class NodeKeeper:
    """One thread: this node's heartbeat, the recording of its long uploads, and the sweep of dead
    nodes' uploads, sessions and rows."""

    def __init__(self, store: Store, node: str, backends: Mapping[str, Backend], *,
                 node_timeout: float, sweep_interval: float, uploads: InFlightUploads | None = None,
                 on_swept: Callable[[], None] | None = None) -> None:
        self._store = store
        # Called when a beat finds this node's row gone: another node took it for dead
        # (silent for node_timeout) and removed its sessions, which must be written again.
        self.on_swept = on_swept
        self._uploads = uploads
        self.node = node
        self._backends = backends
        self.node_timeout = node_timeout
        self.sweep_interval = sweep_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Beat once now (before any upload is recorded under this node), then keep beating."""
        self._store.heartbeat(self.node)
        if self._uploads is not None:
            self._uploads.sweep_dead_journals()
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
                    if not self._store.heartbeat(self.node) and self.on_swept is not None:
                        log.warning("node %s was taken for dead by another node; its sessions are "
                                    "written to the store again", self.node)
                        self.on_swept()
                    if self._uploads is not None:
                        self._uploads.record_due()
                    next_beat = now + beat
                if now >= next_sweep:
                    if self._uploads is not None:
                        self._uploads.sweep_dead_journals()
                    self.sweep()
                    self.sweep_nodes()
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
            log.info("aborted the upload of %r on %s left by node %s (silent for over %ss)",
                     upload.path, upload.backend, upload.node, self.node_timeout)
        return removed

    def sweep_nodes(self) -> tuple[int, int]:
        """Remove the sessions and rows of nodes silent for node_timeout; returns (sessions, nodes)."""
        sessions, nodes = self._store.sweep_dead_nodes(self.node_timeout)
        if sessions or nodes:
            log.info("removed %d session(s) and %d node(s) silent for over %ss", sessions, nodes,
                     self.node_timeout)
        return sessions, nodes
