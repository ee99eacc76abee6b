"""Readiness: every probe (each backend; the state store once it exists) must answer.

Probes run at the same time, each in its own thread, and a check waits for
them at most `timeout` seconds. A probe still running from an earlier check
is not started again (a load balancer polling a hung backend must not pile
up threads); it is reported as not answering.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import GatewayError

Probe = Callable[[], None]   # returns when healthy, raises with a reason otherwise


class _Run:
    def __init__(self, name: str, probe: Probe) -> None:
        self.started = time.monotonic()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(probe,), name=f"readyz-{name}",
                                       daemon=True)

    def _run(self, probe: Probe) -> None:
        try:
            probe()
        except GatewayError as exc:
            self.error = str(exc)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


class Readiness:
    """Named probes, checked together within a time limit."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._probes: dict[str, Probe] = {}
        self._running: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def add(self, name: str, probe: Probe) -> None:
        """Register a probe; `name` starts each of its reasons ("backend 'archive'")."""
        self._probes[name] = probe

    def reasons(self) -> list[str]:
        """Why the gateway is not ready; empty when every probe answered in time."""
        runs: dict[str, _Run] = {}
        with self._lock:
            for name, probe in self._probes.items():
                run = self._running.get(name)
                if run is None or not run.thread.is_alive():
                    run = self._running[name] = _Run(name, probe)
                    run.thread.start()
                runs[name] = run
        deadline = time.monotonic() + self.timeout
        reasons = []
        for name, run in runs.items():
            run.thread.join(max(0.0, deadline - time.monotonic()))
            if run.thread.is_alive():
                reasons.append(f"{name}: no answer after {time.monotonic() - run.started:.0f} s")
            elif run.error is not None:
                reasons.append(f"{name}: {run.error}")
        return reasons

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for probes still running (at shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            run.thread.join(max(0.0, deadline - time.monotonic()))
