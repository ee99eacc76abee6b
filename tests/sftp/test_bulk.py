"""Bulk SFTP transfers: how the subsystem reads its channel, and that every packet still arrives whole."""
from __future__ import annotations

import hashlib
import io
import os
import struct

import paramiko
from paramiko.sftp import CMD_ATTRS, CMD_INIT, CMD_STAT, CMD_VERSION

from tests.conftest import PASSWORD


def _packet(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def _stat(request_id: int, path: bytes) -> bytes:
    return _packet(CMD_STAT, struct.pack(">II", request_id, len(path)) + path)


def _read_packet(channel: paramiko.Channel) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = channel.recv(n - len(data))
            assert chunk, "the server closed the channel"
            data += chunk
        return data
    (size,) = struct.unpack(">I", exactly(4))
    data = exactly(size)
    return data[0], data[1:]


def test_upload_takes_whole_channel_buffers_and_stores_the_content_exactly(sftp, sftp_server, monkeypatch):
    asked: list[int] = []
    original = paramiko.Channel.recv

    def recording(self, nbytes):
        if self.transport.server_mode:
            asked.append(nbytes)
        return original(self, nbytes)

    monkeypatch.setattr(paramiko.Channel, "recv", recording)
    data = os.urandom(8 * 1024 * 1024 + 3)
    sftp.putfo(io.BytesIO(data), "/bulk.bin")
    stored = (sftp_server.data / "alice" / "bulk.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    # Reads of a 4-byte length and then one packet made paramiko's pipe move its
    # whole remaining buffer each time; the subsystem takes what is there instead.
    assert asked and min(asked) >= 1 << 20, sorted(set(asked))[:5]


def test_requests_packed_into_one_send_or_split_byte_by_byte_are_each_answered(sftp_server):
    transport = paramiko.Transport(("127.0.0.1", sftp_server.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        channel = transport.open_session()
        channel.settimeout(30)
        channel.invoke_subsystem("sftp")
        # INIT and three requests in one send: read from the channel in one piece.
        channel.sendall(_packet(CMD_INIT, struct.pack(">I", 3)) + b"".join(_stat(i, b"/") for i in (1, 2, 3)))
        assert _read_packet(channel)[0] == CMD_VERSION
        for request_id in (1, 2, 3):
            kind, body = _read_packet(channel)
            assert (kind, struct.unpack(">I", body[:4])[0]) == (CMD_ATTRS, request_id)
        # One request trickled a byte at a time: put together across many reads.
        for byte in _stat(4, b"/"):
            channel.sendall(bytes([byte]))
        kind, body = _read_packet(channel)
        assert (kind, struct.unpack(">I", body[:4])[0]) == (CMD_ATTRS, 4)
    finally:
        transport.close()
