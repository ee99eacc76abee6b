"""Worker processes: the parent binds the listeners once and forks `[server] workers` processes
that share them, restarts a worker that dies, drains all on SIGTERM/SIGINT and passes SIGHUP on.

The parent serves nothing itself. Before forking it does what must happen once
(the first-run user, the SSH host keys, binding) and then holds no thread and
no open store or backend connection: every worker builds its own Gateway.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import NoReturn

from . import metrics
from .config import Config, ConfigError, Listen, load_config
from .server import (FRONTENDS, Gateway, apply_log_level, check_reload, reloaded_config, reopen_audit_log,
                     run_gateway)
from .uploads import UploadJournal

log = logging.getLogger(__name__)

# Pending connections per listener, shared by all workers.
BACKLOG = 512
# A worker that dies sooner than this after its start is restarted after a
# delay that doubles from the first to the last value; one that ran longer is
# restarted at once.
STABLE_SECONDS = 10.0
RESTART_DELAY_FIRST = 0.5
RESTART_DELAY_MAX = 30.0
# After SIGTERM, workers drain for `[server] drain_timeout`, then stop (which
# takes a few seconds more: cheroot waits up to 5 s for its threads, SFTP
# joins each connection); one still running after drain_timeout plus this
# margin is killed. The systemd unit's TimeoutStopSec must exceed the sum.
DRAIN_MARGIN = 20.0
# prctl(2) option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1
# The signals the parent handles.
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


@dataclass
class Worker:
    """One worker slot: restarted in place, so its index stays while its pid changes."""

    index: int
    pid: int = 0              # 0: not running
    started: float = 0.0      # time.monotonic() of the last fork
    runs: int = 0             # how many times it was started
    delay: float = 0.0        # wait before the next restart
    restart_at: float | None = None


def bind_listeners(config: Config) -> dict[str, socket.socket]:
    """Bind every enabled front-end's listener once, for all workers to accept on.

    Raises:
        ConfigError: naming the key of a listener that cannot bind.
    """
    listeners: dict[str, socket.socket] = {}
    for name in FRONTENDS:
        section = getattr(config, name)
        if not section.enabled:
            continue
        try:
            listeners[name] = _bind(section.listen)
        except OSError as exc:
            for sock in listeners.values():
                sock.close()
            raise ConfigError(f"{config.path}: [{name}] listen: cannot listen on {section.listen}: "
                              f"{exc.strerror or exc}") from None
    return listeners


def _bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    dualstack = listen.host in ("::", "::0") and socket.has_dualstack_ipv6()
    sock = socket.create_server((listen.host, listen.port), family=family, backlog=BACKLOG,
                                dualstack_ipv6=dualstack)
    # Non-blocking from the start: the flag belongs to the socket that every
    # worker shares, and an accept() another worker won must not block.
    sock.setblocking(False)
    return sock


def restart_delay(previous: float, lived: float) -> float:
    """Seconds to wait before restarting a worker that ran `lived` seconds; `previous`: the last wait."""
    if lived >= STABLE_SECONDS:
        return 0.0
    return min(max(previous * 2, RESTART_DELAY_FIRST), RESTART_DELAY_MAX)


def describe_exit(status: int) -> str:
    """A wait status in words: "exited with status 3", "killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """The parent process of `workers` > 1: forks, watches and signals the workers."""

    def __init__(self, config: Config, audit_handler: logging.Handler | None = None) -> None:
        self.config = config
        self.audit_handler = audit_handler
        self.workers = [Worker(i) for i in range(config.server.workers)]
        self.listeners: dict[str, socket.socket] = {}
        self._pending: list[int] = []          # signals received, handled by the loop
        self._ready: set[int] = set()          # worker indexes that reported ready
        self._announced = False
        self._stopping = False
        self._drain_deadline = 0.0
        self._status = 0
        self._wake_r = self._wake_w = self._ready_r = self._ready_w = -1
        # Seconds after SIGTERM until a worker still running is killed.
        self.kill_after = config.server.drain_timeout + DRAIN_MARGIN

    # -- parent ---------------------------------------------------------------

    def run(self) -> int:
        """Prepare, fork the workers and supervise them until SIGTERM or SIGINT; the exit status."""
        notices = self._prepare()
        self.listeners = bind_listeners(self.config)
        for name, sock in self.listeners.items():
            host, port = sock.getsockname()[:2]
            print(f"{name} listening on {host}:{port}", flush=True)
            for notice in notices.get(name, ()):
                print(f"  {notice}", flush=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _HANDLED:
            signal.signal(sig, self._on_signal)
        try:
            for worker in self.workers:
                self._fork(worker)
            self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            for sock in self.listeners.values():
                sock.close()
            for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
                os.close(fd)
        return self._status

    def _prepare(self) -> dict[str, list[str]]:
        """What happens once, in the parent: the first-run user and the SSH host keys.

        Returns the lines to print under each listener.
        """
        gateway = Gateway(self.config)
        # Journals of an earlier run's workers: the first worker's start-up sweep removes every
        # temp file they could name.
        for journal in (gateway.state_dir / "uploads").glob("*"):
            journal.unlink(missing_ok=True)
        try:
            gateway.ensure_first_user()
            notices: dict[str, list[str]] = {}
            if self.config.sftp.enabled:
                from .sftp.hostkey import describe, load_host_keys
                notices["sftp"] = [f"host key {describe(key)}"
                                   for key in load_host_keys(gateway.state_dir, gateway.store)]
        finally:
            # Connections opened here must not be shared with the workers.
            gateway.stop()
        return notices

    def _on_signal(self, signum: int, _frame) -> None:
        # The wakeup fd ends the loop's select(); the loop handles the signal.
        self._pending.append(signum)

    def _loop(self) -> None:
        while True:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            if self._stopping:
                if not any(w.pid for w in self.workers):
                    return
                if now >= self._drain_deadline:
                    for worker in self.workers:
                        if worker.pid:
                            log.warning("worker %d (pid %d) still running %gs after SIGTERM: killing it",
                                        worker.index, worker.pid, self.kill_after)
                            os.kill(worker.pid, signal.SIGKILL)
                    self._status = 1
                    self._drain_deadline = float("inf")
                timeout = max(0.0, min(self._drain_deadline - now, 1.0))
            else:
                for worker in self.workers:
                    if not worker.pid and worker.restart_at is not None and worker.restart_at <= now:
                        self._fork(worker)
                due = [w.restart_at - now for w in self.workers if not w.pid and w.restart_at is not None]
                timeout = max(0.0, min(due, default=1.0))
            try:
                readable, _, _ = select.select([self._wake_r, self._ready_r], [], [], timeout)
            except InterruptedError:
                continue
            if self._wake_r in readable:
                _read_all(self._wake_r)
            if self._ready_r in readable:
                self._read_ready()

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signum)
            elif signum == signal.SIGHUP:
                # The workers inherited the audit log file; the parent lets go of a rotated one too.
                reopen_audit_log(self.audit_handler)
                self._reload()
                log.info("SIGHUP: passing it on to the workers")
                self._signal_workers(signal.SIGHUP)

    def _reload(self) -> None:
        """Keep what the workers' reload applies, for the workers started from now on.

        A config the workers would refuse is refused here too: each worker
        checks and logs it itself.
        """
        try:
            new = load_config(self.config.path)
            check_reload(self.config, new)
        except ConfigError:
            return
        except Exception:     # the parent must outlive whatever a config file holds
            log.exception("SIGHUP: the parent keeps its config")
            return
        self.config = reloaded_config(self.config, new)
        apply_log_level(self.config)
        self.kill_after = self.config.server.drain_timeout + DRAIN_MARGIN

    def _stop(self, signum: int) -> None:
        if not self._stopping:
            log.info("%s: stopping the workers", signal.Signals(signum).name)
            self._stopping = True
            self._drain_deadline = time.monotonic() + self.kill_after
            # Stop accepting: the kernel keeps the port open while any worker
            # still holds it, and each worker closes its copy as it stops.
            for sock in self.listeners.values():
                sock.close()
        self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.pid:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass   # exited; reaped by the loop

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = 0
            self._ready.discard(worker.index)
            metrics.forget_process(pid)
            # A clean stop removed its journal; after a kill, another worker cleans up what it lists.
            UploadJournal.mark_dead(self.config.server.state_dir / "uploads", pid)
            how = describe_exit(status)
            if self._stopping:
                log.info("worker %d (pid %d) %s", worker.index, pid, how)
                if os.waitstatus_to_exitcode(status) != 0:
                    self._status = 1
            elif not self._announced:
                # It never served: the next one would fail the same way.
                log.error("worker %d (pid %d) %s while starting; stopping", worker.index, pid, how)
                code = os.waitstatus_to_exitcode(status)
                self._status = code if code > 0 else 1
                self._stop(signal.SIGTERM)
            else:
                lived = time.monotonic() - worker.started
                worker.delay = restart_delay(worker.delay, lived)
                worker.restart_at = time.monotonic() + worker.delay
                log.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                            worker.index, pid, how, lived, worker.delay)

    def _read_ready(self) -> None:
        for line in _read_all(self._ready_r).split():
            index = int(line)
            self._ready.add(index)
            log.info("worker %d (pid %d) ready", index, self.workers[index].pid)
        if not self._announced and not self._stopping and len(self._ready) == len(self.workers):
            self._announced = True
            print("gateway ready", flush=True)

    def _fork(self, worker: Worker) -> None:
        # A thread would be copied into the child as a corpse holding whatever
        # locks it held at that moment.
        threads = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if threads:
            raise RuntimeError(f"cannot fork workers while threads run: {', '.join(threads)}")
        sys.stdout.flush()
        sys.stderr.flush()
        worker.runs += 1
        worker.restart_at = None
        # Held back across fork(): the child sets its own handlers before it
        # takes any signal (the parent's would only note it in the child's copy).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._run_worker(worker, mask, parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker.pid = pid
        worker.started = time.monotonic()
        log.info("worker %d started: pid %d", worker.index, pid)

    # -- worker ---------------------------------------------------------------

    def _run_worker(self, worker: Worker, mask: set[signal.Signals], parent: int) -> NoReturn:
        """The child after fork(): serve as one gateway process, then exit without returning."""
        status = 1
        try:
            _end_with_parent(parent)
            # Until run_gateway sets its own handlers: SIGTERM and SIGINT end a
            # worker that has nothing to drain yet, and SIGHUP must not.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (self._wake_r, self._wake_w, self._ready_r):
                os.close(fd)
            gateway = Gateway(self.config)
            gateway.listeners = MappingProxyType(self.listeners)
            gateway.sweep_at_start = worker.index == 0 and worker.runs == 1
            gateway.journal_uploads = True
            status = run_gateway(gateway, self.audit_handler,
                                 on_ready=lambda: os.write(self._ready_w, f"{worker.index}\n".encode()))
        except ConfigError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            status = 2
        except BaseException:
            log.exception("worker %d failed", worker.index)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                # Never return into the parent's stack (its finally blocks, atexit).
                os._exit(status)


def _end_with_parent(parent: int) -> None:
    """In a worker just forked: drain and stop (SIGTERM) when the parent dies, even by SIGKILL.

    A worker outliving its parent would serve on without restarts or drain,
    and keep the ports bound, so the next `gateway serve` could not start.
    Linux only; elsewhere a worker notices nothing.
    """
    try:
        # The symbols already loaded (libc among them): no library search, no subprocess.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as exc:
        log.warning("a worker will not stop with its parent: %s", exc)
        return
    if os.getppid() != parent:
        # The parent died before the request took effect: nobody will signal.
        os.kill(os.getpid(), signal.SIGTERM)


def _read_all(fd: int) -> bytes:
    """What can be read from a non-blocking pipe now."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
