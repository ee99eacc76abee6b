"""wsgidav's folder pages (GET/HEAD on a folder), consulted only for GET and HEAD.

`WsgiDavDirBrowser` sits in the middleware stack in front of every request and
resolves the request's resource first, whatever the method: one backend stat
that only a GET or HEAD can use. For every other method (PROPFIND, LOCK, PUT,
PROPPATCH, UNLOCK, ...) the request server resolves the resource again, so
Windows Explorer's small-file sequence paid two stats per request.
"""
from __future__ import annotations

from wsgidav.dir_browser import WsgiDavDirBrowser


class DirBrowser(WsgiDavDirBrowser):
    """WsgiDavDirBrowser that hands every request but GET and HEAD on at once."""

    def __call__(self, environ: dict, start_response):
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return self.next_app(environ, start_response)
        return super().__call__(environ, start_response)
