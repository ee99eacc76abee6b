"""Prometheus metrics of the gateway, and the registry the admin listener's /metrics reads.

prometheus-client picks where values live when it is first imported: with
PROMETHEUS_MULTIPROC_DIR set, every process writes its values to files in that
directory and `registry()` adds them up across worker processes; without it,
values live in this process. A parent that forks workers sets the variable
(an empty directory under state_dir) before anything imports this module.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds; from a local stat (sub-millisecond) to a slow S3 request.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
# Seconds; a transfer lasts from milliseconds to hours.
_TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_children: dict[tuple[int, tuple[str, ...]], object] = {}


def child(metric, *labels: str):
    """`metric.labels(*labels)`, remembered: the very child labels() gives, at a dict lookup's cost.

    labels() checks its arguments and takes a lock on every call, and a small
    WebDAV request makes about ten of them.
    """
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


# Gauges in multiprocess mode: "livesum" adds up the processes still alive,
# so a worker that died takes its open connections with it.
CONNECTIONS_OPEN = Gauge("gateway_connections_open", "Client connections open now",
                         ["protocol"], multiprocess_mode="livesum")
CONNECTIONS = Counter("gateway_connections", "Client connections accepted", ["protocol"])
LOGINS = Counter("gateway_logins", "Logins checked (a cached WebDAV credential is not a new login)",
                 ["protocol", "method", "result"])
BANS = Counter("gateway_bans", "Client addresses banned by the defender")
TRANSFER_BYTES = Counter("gateway_transfer_bytes", "File content bytes received (in) and sent (out)",
                         ["protocol", "direction"])
OPERATIONS = Counter("gateway_operations", "File operations, as written to the audit log",
                     ["protocol", "op", "result"])
TRANSFER_SECONDS = Histogram("gateway_transfer_duration_seconds",
                             "Uploads from open to commit or abort, downloads from open to close",
                             ["protocol", "direction"], buckets=_TRANSFER_BUCKETS)
UPLOADS_IN_FLIGHT = Gauge("gateway_uploads_in_flight", "Uploads open and not yet committed or aborted",
                          ["protocol"], multiprocess_mode="livesum")
BACKEND_SECONDS = Histogram("gateway_backend_request_duration_seconds",
                            "Storage backend calls, by backend name and operation",
                            ["backend", "op"], buckets=_LATENCY_BUCKETS)
BACKEND_ERRORS = Counter("gateway_backend_errors", "Storage backend calls that raised, by error",
                         ["backend", "op", "error"])
STORE_SECONDS = Histogram("gateway_store_request_duration_seconds", "State store calls, by operation",
                          ["op"], buckets=_LATENCY_BUCKETS)


def error_label(exc_type: type[BaseException]) -> str:
    """An error class as a label value and audit result: snake case ("not_found")."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", exc_type.__name__).lower()


def registry(multiproc_dir: str | os.PathLike | None = None) -> CollectorRegistry:
    """The registry to expose: this process's, or the sum over every process writing to a directory.

    The directory is `multiproc_dir` if given, else PROMETHEUS_MULTIPROC_DIR.
    """
    path = multiproc_dir or os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    combined = CollectorRegistry()
    MultiProcessCollector(combined, path=str(Path(path)))
    return combined


def exposition(source: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text format of `source`, and its content type."""
    return generate_latest(source), CONTENT_TYPE_LATEST


def forget_process(pid: int, multiproc_dir: str | os.PathLike | None = None) -> None:
    """Drop the live gauges (open connections, uploads in flight) of a worker that exited.

    Its counters and histograms stay: they still count what it did.
    """
    path = multiproc_dir or os.environ.get(MULTIPROC_ENV)
    if path:
        mark_process_dead(pid, str(path))
