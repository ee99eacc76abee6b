"""wsgidav's folder browser, consulted only by the requests it can answer.

`WsgiDavDirBrowser` looks the request's resource up for every request, to
answer GET and HEAD on folders, and passes the rest on; the handler further
down looks the same resource up again. A PUT's handler does that lookup as its
first step, so the browser's lookup only doubled the work (a stat through the
whole backend stack): PUT goes straight on. GET and HEAD keep the browser; the
provider answers their second lookup of the same path from the first.
"""
from __future__ import annotations

from wsgidav.dir_browser import WsgiDavDirBrowser

# Methods the browser never answers whose handler starts by looking up the
# request's path: skipping the browser changes no answer, only the work.
_PASS_THROUGH = frozenset({"PUT"})


class DirBrowser(WsgiDavDirBrowser):
    """The folder browser, skipped for methods it never answers."""

    def __call__(self, environ: dict, start_response):
        if environ.get("REQUEST_METHOD") in _PASS_THROUGH:
            return self.next_app(environ, start_response)
        return super().__call__(environ, start_response)
