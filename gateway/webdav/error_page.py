"""Our error responses in place of wsgidav's ErrorPrinter: short bodies, tracebacks in the log only.

wsgidav renders every status page through `DAVError.get_response_page()`: HTML
naming `WsgiDAV/<version>`, the server's clock and, for a 500, the source
exception's text. `ErrorPages` takes ErrorPrinter's place at the top of the
middleware stack: it turns raised DAVErrors and unexpected exceptions into a
one-line text/plain body, and replaces the HTML pages wsgidav returns without
raising (an error on the request's own resource, `201 Created`). DAV error
condition bodies (`<D:error><D:lock-token-submitted>...`) are XML that clients
read: they pass through unchanged.
"""
from __future__ import annotations

import logging

from wsgidav.dav_error import DAVError, get_http_status_string
from wsgidav.mw.base_mw import BaseMiddleware

from ..errors import GatewayError

log = logging.getLogger(__name__)

_NO_BODY = (204, 304)
# environ key: an unexpected exception of this request, logged once when it ends.
UNEXPECTED_ERROR = "gateway.unexpected_error"


def _status_code(status: str) -> int:
    return int(status.split(" ", 1)[0])


def _request_line(environ: dict) -> str:
    query = environ.get("QUERY_STRING")
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return f"{environ.get('REQUEST_METHOD', '?')} {path}{'?' + query if query else ''}"


def _client_timeout(exc: BaseException | None) -> TimeoutError | None:
    """The socket timeout behind `exc` (wrapped by wsgidav or not): the client stalled or crawled.

    A GatewayError ends the search: its timeouts are storage's or the
    store's (an S3 read timeout is a 503, not the client's 408), and so is
    whatever it replaced with `raise ... from None`.
    """
    for _ in range(8):
        if exc is None or isinstance(exc, TimeoutError):
            return exc
        if isinstance(exc, GatewayError):
            return None
        wrapped = getattr(exc, "src_exception", None) or exc.__cause__
        if wrapped is None and not exc.__suppress_context__:
            wrapped = exc.__context__
        exc = wrapped
    return None


def _log_unexpected(environ: dict) -> None:
    """Log the request's unexpected exception, if any, once: the request line and its traceback."""
    if UNEXPECTED_ERROR in environ:
        # The request line is the client's, decoded: %r keeps a "%0a" in it from starting a log line.
        log.error("%r: internal error", _request_line(environ), exc_info=environ.pop(UNEXPECTED_ERROR))


class _Captured:
    """start_response for the inner application: holds the response until we decide on it."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.exc_info = None

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info=None):
        self.status, self.headers, self.exc_info = status, list(headers), exc_info
        return self._write_unsupported

    @staticmethod
    def _write_unsupported(data: bytes) -> None:
        raise RuntimeError("the write() callable is not supported here")

    def is_status_page(self) -> bool:
        """True for a wsgidav HTML status page (an error, or `201 Created`), not a file or listing."""
        content_type = next((v for k, v in self.headers if k.lower() == "content-type"), "")
        return content_type.startswith("text/html") and _status_code(self.status) not in (200, 206)


class ErrorPages(BaseMiddleware):
    """wsgidav middleware: every error becomes a short answer; unexpected ones are logged once.

    The log line (ERROR) names the request line and carries the traceback of
    the exception recorded under UNEXPECTED_ERROR, by this middleware or by
    the provider for exceptions wsgidav catches itself.
    """

    def __call__(self, environ: dict, start_response):
        try:
            yield from self._respond(environ, start_response)
        finally:
            _log_unexpected(environ)   # e.g. a failed member in a 207 Multi-Status

    def _respond(self, environ: dict, start_response):
        captured = _Captured()
        started = False
        try:
            app_iter = self.next_app(environ, captured)
            try:
                for chunk in app_iter:
                    if not started:
                        started = True
                        if captured.is_status_page():
                            yield from self._replace_page(environ, start_response, captured)
                            return
                        start_response(captured.status, captured.headers, captured.exc_info)
                    yield chunk
                if not started:
                    started = True
                    if captured.is_status_page():
                        yield from self._replace_page(environ, start_response, captured)
                        return
                    start_response(captured.status, captured.headers, captured.exc_info)
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            timeout = _client_timeout(exc)
            if timeout is not None:
                # The client stalled, or moved under the minimum rate (pace.py):
                # not our error. A body left unread closes the connection.
                environ.pop(UNEXPECTED_ERROR, None)
                log.info("%s from %s ended: the client was too slow (%s)", _request_line(environ),
                         environ.get("REMOTE_ADDR", ""), timeout)
                if started:
                    raise
                yield from self._page(environ, start_response, "408 Request Timeout", [])
                return
            if not isinstance(exc, DAVError):
                environ.setdefault(UNEXPECTED_ERROR, exc)
                exc = DAVError(500)
            elif exc.value == 500:
                # The exception wsgidav wrapped, else the DAVError itself.
                environ.setdefault(UNEXPECTED_ERROR, exc.src_exception or exc)
            if started:
                raise   # the status line is out; cheroot drops the connection
            _log_unexpected(environ)
            yield from self._error(environ, start_response, exc)

    def _replace_page(self, environ: dict, start_response, captured: _Captured):
        if _status_code(captured.status) == 500:
            # wsgidav caught this one itself (DELETE, COPY, MOVE) and logs it
            # only at its own verbose levels; the provider may have kept it.
            environ.setdefault(UNEXPECTED_ERROR, None)
        _log_unexpected(environ)
        yield from self._page(environ, start_response, captured.status, captured.headers)

    def _error(self, environ: dict, start_response, exc: DAVError):
        status = get_http_status_string(exc)
        headers = list(exc.add_headers or [])
        if exc.err_condition is not None:
            # RFC 4918 precondition XML: no version, time or exception in it.
            content_type, body = exc.get_response_page()
            yield from self._send(environ, start_response, status, headers, content_type, body)
            return
        # Security: 5xx say nothing about the cause (paths of the server, backend
        # messages); 4xx carry our own short reason.
        detail = exc.context_info if exc.value < 500 and exc.context_info else ""
        yield from self._page(environ, start_response, status, headers, detail)

    def _page(self, environ: dict, start_response, status: str, headers: list[tuple[str, str]],
              detail: str = ""):
        keep = [(k, v) for k, v in headers
                if k.lower() not in ("content-type", "content-length", "date")]
        text = status + (f": {detail}" if detail else "")
        body = (text + "\n").encode("utf-8", "replace")
        yield from self._send(environ, start_response, status, keep, "text/plain; charset=utf-8",
                              body)

    @staticmethod
    def _send(environ: dict, start_response, status: str, headers: list[tuple[str, str]],
              content_type: str, body: bytes):
        if _status_code(status) in _NO_BODY or environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
            headers = headers + [("Content-Length", "0")]
        else:
            headers = headers + [("Content-Type", content_type), ("Content-Length", str(len(body)))]
            if not any(k.lower() == "x-content-type-options" for k, _ in headers):
                headers.append(("X-Content-Type-Options", "nosniff"))
        start_response(status, headers)
        yield body
