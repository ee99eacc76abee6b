"""cheroot adjusted so that a refused request body is never read.

Stock cheroot answers `Expect: 100-continue` before the application runs, and
after an early response (401, 403, 413) it reads whatever body is left in one
`read()` call, into memory. Here `100 Continue` goes out only when the
application first reads the body (PEP 3333's second option), and a response
sent while body bytes are still unread closes the connection instead.
"""
from __future__ import annotations

from cheroot import server as cheroot_server
from cheroot import wsgi

from .. import metrics

_CONTINUE_SUFFIX = b" 100 Continue\r\n\r\n"


class _ContinueCatcher:
    """Stands in for the connection's writer while headers are read; holds back `100 Continue`."""

    def __init__(self, wfile) -> None:
        self._wfile = wfile
        self.caught = False

    def write(self, data: bytes) -> int:
        if data.endswith(_CONTINUE_SUFFIX) and data.startswith(b"HTTP/"):
            self.caught = True
            return len(data)
        return self._wfile.write(data)

    def __getattr__(self, name: str):
        return getattr(self._wfile, name)


class DeferredContinueRequest(cheroot_server.HTTPRequest):
    """An HTTPRequest that owes the client `100 Continue` until the body is first read."""

    continue_pending = False

    def read_request_headers(self) -> bool:
        real = self.conn.wfile
        catcher = _ContinueCatcher(real)
        self.conn.wfile = catcher
        try:
            return super().read_request_headers()
        finally:
            self.conn.wfile = real
            self.continue_pending = catcher.caught

    def send_continue(self) -> None:
        if self.continue_pending and not self.sent_headers:
            self.continue_pending = False
            self.conn.wfile.write(self.server.protocol.encode("ascii") + _CONTINUE_SUFFIX)

    def body_unread(self) -> bool:
        rfile = getattr(self, "rfile", None)
        if rfile is None:
            return False
        if self.chunked_read:
            return not getattr(rfile, "closed", True)
        return getattr(rfile, "remaining", 0) > 0


class DeferredContinueConnection(cheroot_server.HTTPConnection):
    """A client connection, counted in the metrics from accept to close."""

    RequestHandlerClass = DeferredContinueRequest

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._counted = True
        metrics.CONNECTIONS.labels("webdav").inc()
        metrics.CONNECTIONS_OPEN.labels("webdav").inc()

    def close(self) -> None:
        try:
            super().close()
        finally:
            # cheroot may close a connection more than once.
            if getattr(self, "_counted", False):
                self._counted = False
                metrics.CONNECTIONS_OPEN.labels("webdav").dec()


class _RequestBody:
    """wsgi.input: sends the owed `100 Continue` on the first read, then reads through."""

    def __init__(self, req: DeferredContinueRequest) -> None:
        self._req = req
        self._rfile = req.rfile

    def read(self, size: int | None = None) -> bytes:
        self._req.send_continue()
        return self._rfile.read(size)

    def readline(self, size: int | None = None) -> bytes:
        self._req.send_continue()
        return self._rfile.readline(size)

    def readlines(self, hint: int = 0) -> list[bytes]:
        self._req.send_continue()
        return self._rfile.readlines(hint)

    def __iter__(self):
        self._req.send_continue()
        return iter(self._rfile)


class GuardedGateway(wsgi.Gateway_10):
    """WSGI 1.0 gateway with the deferred body and close-on-early-response."""

    def get_environ(self) -> dict:
        env = super().get_environ()
        env["wsgi.input"] = _RequestBody(self.req)
        return env

    def start_response(self, status, headers, exc_info=None):
        req = self.req
        if isinstance(req, DeferredContinueRequest) and req.body_unread():
            # Answering before the body is read: close rather than let cheroot
            # drain (and buffer) a body we refused.
            req.close_connection = True
        return super().start_response(status, headers, exc_info)


def make_server(bind: tuple[str, int], app, *, threads: int, timeout: int) -> wsgi.Server:
    """A cheroot WSGI server with the refinements above."""
    server = wsgi.Server(bind, app, numthreads=threads, timeout=timeout, server_name="gateway",
                         request_queue_size=64, shutdown_timeout=5)
    server.ConnectionClass = DeferredContinueConnection
    server.gateway = GuardedGateway
    return server
