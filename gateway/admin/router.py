"""A small WSGI router: path templates to per-method handlers, JSON errors for the rest.

A handler takes a `Request` and returns a `Response`. Unknown paths answer
404, known paths with another method 405 (with Allow), both as JSON.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Request:
    """What a handler sees of one request: method, path, its template's parameters, the environ."""

    method: str
    path: str
    params: dict[str, str]
    environ: dict


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, (json.dumps(data, indent=None) + "\n").encode(), headers=list(headers))


Handler = Callable[[Request], Response]


def _compile(template: str) -> re.Pattern:
    """"/api/v1/users/{name}" -> a pattern whose groups are the parameters (one segment each)."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
                      for i, part in enumerate(parts))
    return re.compile(f"^{pattern}$")


class Router:
    """A WSGI application dispatching on path template and method."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern, dict[str, Handler]]] = []

    def add(self, template: str, method: str, handler: Handler) -> None:
        for known, _pattern, methods in self._routes:
            if known == template:
                methods[method] = handler
                return
        self._routes.append((template, _compile(template), {method: handler}))

    def routes(self) -> list[tuple[str, str]]:
        """Every (path template, method) served, in the order added (HEAD is implied by GET)."""
        return [(template, method) for template, _pattern, methods in self._routes for method in methods]

    def _dispatch(self, environ: dict) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        for _template, pattern, methods in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            handler = methods.get("GET" if method == "HEAD" else method)
            if handler is None:
                allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
                return json_response(405, {"error": f"method {method} not allowed on {path}",
                                           "allowed": allowed}, [("Allow", ", ".join(allowed))])
            return handler(Request(method, path, match.groupdict(), environ))
        return json_response(404, {"error": f"no such resource: {path}"})

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        try:
            response = self._dispatch(environ)
        except Exception:
            # The path is the client's, decoded: %r keeps a "%0a" in it from starting a log line.
            log.exception("admin request %r %r failed", environ.get("REQUEST_METHOD"),
                          environ.get("PATH_INFO"))
            response = json_response(500, {"error": "internal error; see the gateway's log"})
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store")] + response.headers
        reason = _REASONS.get(response.status, "")
        start_response(f"{response.status} {reason}".strip(), headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]
