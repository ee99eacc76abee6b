"""What the SFTP side logs when connections end: one line, at the level it deserves, naming the address.

paramiko logs a port probe as a 30-line ERROR traceback and every reset
disconnect at ERROR; scanners and load-balancer health checks would fill the
log and bury real errors.
"""
from __future__ import annotations

import logging
import socket
import struct

import paramiko
import pytest

from tests.conftest import PASSWORD, wait_for

ADDRESS = "127.0.0.1"


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def _connection_end(logs, level: int, what: str) -> logging.LogRecord:
    """Wait for the one record that says how the server saw a connection end."""
    def found() -> list[logging.LogRecord]:
        return [r for r in logs.records if r.levelno == level and r.name.startswith("paramiko")
                and ADDRESS in r.getMessage() and r.threadName.startswith("sftp-conn")]
    wait_for(found, what, limit=30)
    return found()[0]


def _no_error_and_no_traceback(logs) -> None:
    bad = [f"{r.levelname} {r.threadName}: {r.getMessage()[:120]}" for r in logs.records
           if r.levelno >= logging.ERROR or "Traceback" in r.getMessage() or r.exc_info]
    assert bad == []


def _server_lines(logs) -> list[logging.LogRecord]:
    """What the server's connection thread logged at INFO or above."""
    return [r for r in logs.records if r.levelno >= logging.INFO and r.threadName.startswith("sftp-conn")]


def test_a_port_probe_is_one_info_line_naming_the_address(sftp_server, logs):
    with socket.create_connection((ADDRESS, sftp_server.sftp_port)):
        pass
    _connection_end(logs, logging.INFO, "the probe's log line")
    assert len(_server_lines(logs)) == 1
    _no_error_and_no_traceback(logs)


def test_a_client_that_never_sends_its_banner_is_one_info_line(sftp_server, logs):
    with socket.create_connection((ADDRESS, sftp_server.sftp_port)) as sock:
        assert sock.recv(256).startswith(b"SSH-2.0-")
    _connection_end(logs, logging.INFO, "the banner-less client's log line")
    assert len(_server_lines(logs)) == 1
    _no_error_and_no_traceback(logs)


def test_a_client_speaking_another_protocol_is_one_warning_quoting_it(sftp_server, logs):
    with socket.create_connection((ADDRESS, sftp_server.sftp_port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(256)
    record = _connection_end(logs, logging.WARNING, "the warning about the HTTP client")
    assert "GET / HTTP/1.1" in record.getMessage()
    assert len(_server_lines(logs)) == 1
    _no_error_and_no_traceback(logs)


def test_a_session_that_ends_with_a_reset_is_logged_below_warning(sftp_server, logs):
    sock = socket.create_connection((ADDRESS, sftp_server.sftp_port))
    transport = paramiko.Transport(sock)
    try:
        transport.connect(username="alice", password=PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp.listdir("/") is not None
        # Linger 0: close() sends a TCP reset, as many clients end a session.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        transport.close()
    record = _connection_end(logs, logging.DEBUG, "the reset's log line")
    assert "reset" in record.getMessage()
    assert not [r for r in _server_lines(logs) if r.levelno >= logging.WARNING]
    _no_error_and_no_traceback(logs)
