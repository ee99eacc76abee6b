"""The audit trail: one JSON line per file operation and login, counted in the metrics too.

Lines go to the logger "gateway.audit". `setup_audit_log` sends them to a file
(reopened on SIGHUP, for logrotate) or to stdout ("-"); without either they
reach the main log at level INFO. Keys: time (RFC 3339, UTC), user, protocol,
ip, session, op, path, bytes, result, duration_ms, and `to` for the target of
a rename or copy; a login line has op "login" and its `method`.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from . import metrics

log = logging.getLogger("gateway.audit")

STDOUT = "-"


def result_of(exc: BaseException) -> str:
    """The audit and metrics result for an error: its class in snake case ("not_found")."""
    return metrics.error_label(type(exc))


def record_operation(*, user: str, protocol: str, ip: str, session: str, op: str, path: str,
                     result: str, size: int | None = None, duration: float | None = None,
                     target: str = "", direction: str = "") -> None:
    """Write one operation's audit line and count it.

    `direction` ("in" or "out") marks a transfer: its bytes and duration go
    to the transfer metrics as well.
    """
    metrics.child(metrics.OPERATIONS, protocol, op, result).inc()
    if direction:
        if size:
            metrics.child(metrics.TRANSFER_BYTES, protocol, direction).inc(size)
        if duration is not None:
            metrics.child(metrics.TRANSFER_SECONDS, protocol, direction).observe(duration)
    if log.isEnabledFor(logging.INFO):
        line = {"time": _now(), "user": user, "protocol": protocol, "ip": ip, "session": session,
                "op": op, "path": path, "bytes": size, "result": result,
                "duration_ms": None if duration is None else round(duration * 1000, 3)}
        if target:
            line["to"] = target
        log.info("%s", _dumps(line))


def record_login(*, user: str, protocol: str, ip: str, method: str, ok: bool, session: str = "") -> None:
    """Write one login's audit line (result "ok" or "failed") and count it."""
    result = "ok" if ok else "failed"
    metrics.LOGINS.labels(protocol, method, result).inc()
    if log.isEnabledFor(logging.INFO):
        log.info("%s", _dumps({
            "time": _now(), "user": user, "protocol": protocol, "ip": ip, "session": session,
            "op": "login", "path": "", "bytes": None, "result": result, "duration_ms": None,
            "method": method}))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(line: dict) -> str:
    # ensure_ascii keeps a line one line, and valid UTF-8 whatever bytes a path held.
    return json.dumps(line, ensure_ascii=True)


class ReopeningFileHandler(logging.FileHandler):
    """A file handler that opens its path afresh on `reopen()` (after logrotate moved the file)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup_audit_log(target: str | None) -> logging.Handler | None:
    """Send audit lines to `target` (a file path, or "-" for stdout) as JSON lines.

    Returns the handler (whose `reopen()` SIGHUP calls, for a file), or None
    when there is no target: then the lines go to the main log, at its level.

    Raises:
        OSError: the file cannot be opened for appending.
    """
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    if target is None:
        log.setLevel(logging.NOTSET)
        log.propagate = True
        return None
    if target == STDOUT:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        handler = ReopeningFileHandler(target, encoding="utf-8")
    # The line is the whole message: no prefix, whatever the main log's format.
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    return handler
