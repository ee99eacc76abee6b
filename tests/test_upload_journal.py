"""A worker's journal of young uploads: compacted while it runs, cleaned up after it dies."""
from __future__ import annotations

import json
import os

from gateway.storage.base import TEMP_PREFIX
from gateway.storage.local import LocalBackend, LocalConfig
from gateway.store import InFlightUpload, open_store
from gateway.uploads import InFlightUploads, UploadJournal


def _record(i: int) -> InFlightUpload:
    return InFlightUpload(f"id{i}", "node", "local", f"/f{i}", f"{TEMP_PREFIX}{i}", 0.0)


def test_the_journal_is_rewritten_with_only_live_uploads_once_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(UploadJournal, "COMPACT_AFTER", 3)
    journal = UploadJournal(tmp_path, 1234)
    for i in range(3):
        journal.add(_record(i))
    journal.drop("id0")
    journal.drop("id1")
    journal.add(_record(3))
    ids = [json.loads(line)["id"] for line in (tmp_path / "1234.journal").read_text().splitlines()]
    assert ids == ["id2", "id3"]
    journal.close()
    assert not list(tmp_path.iterdir())


def test_a_dead_workers_journal_is_swept_once_and_a_torn_line_is_skipped(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    backend = LocalBackend(LocalConfig(str(root)))
    store = open_store("sqlite:///gateway.db", tmp_path)
    try:
        upload = backend.open_write("/big.bin")
        upload.write(b"partial")
        temp = upload.backend_id
        (root / "user.txt").write_text("keep me")
        journals = tmp_path / "uploads"
        journal = UploadJournal(journals, 99)
        journal.add(InFlightUpload("a", "node", "local", "/big.bin", temp, 0.0))
        os.write(journal._fd, b'{"id":"b","node":"n","backend":"local","pa')     # killed mid-write
        UploadJournal.mark_dead(journals, 99)
        uploads = InFlightUploads(store, "other", {"local": backend}, journal_dir=journals)
        assert uploads.sweep_dead_journals() == 1
        assert sorted(p.name for p in root.iterdir()) == ["user.txt"]
        assert not list(journals.iterdir())
        assert uploads.sweep_dead_journals() == 0
        os.close(journal._fd)
    finally:
        store.close()
        backend.close()
