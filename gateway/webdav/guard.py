"""Request checks wsgidav does not make: XML body limits, DTDs, macOS files, bad paths.

`RequestGuard` sits in wsgidav's middleware stack after authentication, so no
body is read for a client that has not logged in. `front_door` wraps the whole
wsgidav application and answers what would otherwise crash it (paths that are
not UTF-8, unreadable Basic credentials) with a 400 or 401.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from urllib.parse import unquote, urlparse

from wsgidav.dav_error import DAVError
from wsgidav.mw.base_mw import BaseMiddleware

from .auth import REALM
from .provider import is_macos_name

# Methods whose bodies wsgidav parses as XML.
_XML_METHODS = frozenset({"PROPFIND", "PROPPATCH", "LOCK", "UNLOCK"})
# Methods that create or change the resource named by the request path.
_CREATING_METHODS = frozenset({"PUT", "MKCOL", "LOCK", "PROPPATCH"})
# WebDAV bodies never need a DTD; refusing any DOCTYPE rules out external
# entities (XXE) and entity-expansion bombs before a parser sees them.
_DOCTYPE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
# The encoding an XML declaration names (XML 1.0 section 4.3.3).
_DECLARED_ENCODING = re.compile(r"""^<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._-]*)["']""")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class RequestGuard(BaseMiddleware):
    """wsgidav middleware: bounded, DTD-free XML bodies and the macOS-file policy."""

    def __init__(self, wsgidav_app, next_app, config: dict) -> None:
        super().__init__(wsgidav_app, next_app, config)
        options = config["gateway"]
        self.max_xml_body: int = options["max_xml_body"]
        self.macos_files: str = options["macos_files"]

    def __call__(self, environ: dict, start_response):
        method = environ.get("REQUEST_METHOD", "")
        if self.macos_files == "refuse":
            self._refuse_macos(environ, method)
        if method in _XML_METHODS:
            self._buffer_xml_body(environ)
        return self.next_app(environ, start_response)

    def _refuse_macos(self, environ: dict, method: str) -> None:
        targets = []
        if method in _CREATING_METHODS:
            targets.append(environ.get("PATH_INFO", ""))
        if method in ("COPY", "MOVE") and environ.get("HTTP_DESTINATION"):
            targets.append(unquote(urlparse(environ["HTTP_DESTINATION"]).path))
        for target in targets:
            if is_macos_name(target.rstrip("/").rpartition("/")[2]):
                raise DAVError(403, context_info="macOS metadata files are not accepted here")

    def _buffer_xml_body(self, environ: dict) -> None:
        """Read the XML body once, within the limit, and hand wsgidav a checked copy.

        Raises:
            DAVError: 413 for a body over `max_xml_body`, 400 for a DTD or a
                body that is not UTF-8 (see `_utf8_text`).
        """
        text = environ.get("CONTENT_LENGTH", "").strip()
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked:
            if not text or text == "0":
                return
            if not text.isdigit():
                raise DAVError(400, context_info="invalid Content-Length")
            if int(text) > self.max_xml_body:
                raise DAVError(413, context_info=f"XML body over {self.max_xml_body} bytes")
            body = environ["wsgi.input"].read(int(text))
        else:
            body = environ["wsgi.input"].read(self.max_xml_body + 1)
            if len(body) > self.max_xml_body:
                raise DAVError(413, context_info=f"XML body over {self.max_xml_body} bytes")
            if environ["wsgi.input"].read(1):
                raise DAVError(413, context_info=f"XML body over {self.max_xml_body} bytes")
        environ["wsgidav.some_input_read"] = 1
        environ["wsgidav.all_input_read"] = 1
        if _DOCTYPE.search(_utf8_text(body)):
            raise DAVError(400, context_info="DTDs and entity declarations are not accepted")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)


def _utf8_text(body: bytes) -> str:
    """The XML body as text; only UTF-8 (with or without its BOM) is accepted.

    Security: the DTD check must see what the parser will see. In UTF-16,
    UTF-32 or UTF-7 "<!DOCTYPE" is not those bytes, and lxml would decode them
    from a BOM, from NUL patterns or from the XML declaration. WebDAV clients
    send UTF-8 (RFC 4918 requires servers to accept it, not anything else).

    Raises:
        DAVError: 400 for another encoding, bytes that are not UTF-8, or NUL.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DAVError(400, context_info="XML body is not valid UTF-8") from None
    if "\x00" in text:
        # Never in XML; UTF-16 and UTF-32 without a BOM are full of them.
        raise DAVError(400, context_info="XML body is not valid UTF-8")
    declared = _DECLARED_ENCODING.match(text.lstrip())
    if declared and declared.group(1).lower() not in _UTF8_NAMES:
        raise DAVError(400, context_info=f"XML body must be UTF-8, not {declared.group(1)}")
    return text


def _plain(start_response, status: str, text: str, extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))] + (extra or []))
    return [body]


def _credentials_readable(header: str) -> bool:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return True  # wsgidav answers other schemes with a Basic challenge
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    return ":" in decoded


def _climbs_above_root(path: str) -> bool:
    depth = 0
    for segment in path.split("/"):
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in ("", "."):
            depth += 1
    return False


def front_door(app, defender):
    """Wrap the wsgidav application with checks that must run before it parses anything.

    The defender's bans apply here, before credentials are read: a banned
    address costs no argon2 verification. Its connection limits apply earlier,
    when cheroot accepts a connection (http.HeaderGate).
    """

    def guarded(environ: dict, start_response):
        if defender.is_banned(environ.get("REMOTE_ADDR", "")):
            return _plain(start_response, "403 Forbidden", "too many failed logins; try again later")
        return checked(environ, start_response)

    def checked(environ: dict, start_response):
        try:
            path = environ["PATH_INFO"].encode("iso-8859-1").decode("utf-8")
        except UnicodeError:
            # Overlong or broken UTF-8 never reaches path handling.
            return _plain(start_response, "400 Bad Request", "request path is not valid UTF-8")
        if _climbs_above_root(path):
            # wsgidav's own check here returns from a generator and sends no response.
            return _plain(start_response, "400 Bad Request", "request path climbs above the root")
        auth = environ.get("HTTP_AUTHORIZATION")
        if auth is not None and not _credentials_readable(auth):
            return _plain(start_response, "401 Unauthorized", "unreadable credentials",
                          [("WWW-Authenticate", f'Basic realm="{REALM}"')])
        return app(environ, start_response)

    return guarded
