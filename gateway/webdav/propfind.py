"""PROPFIND at Depth 0 and 1, answered with one listing and one store query per folder.

wsgidav builds a resource object per child, asks it for every property in
turn (each dead or unknown property one store query) and builds the answer as
an lxml tree: 10,000 children took seconds. Here the children's properties come
from the listing's entries, their dead properties and locks from one query
each, and the multistatus is written as text. The answer is the one wsgidav
gives (same hrefs, values, status per property); whatever is not common (a
child with a lock of its own, a mount point, the requested resource itself)
is still asked of the wsgidav resource, and requests this module does not
handle (Depth: infinity or none, conditional headers) go to wsgidav unchanged.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING
from urllib.parse import quote
from xml.sax.saxutils import escape

from wsgidav import util
from wsgidav.dav_error import HTTP_BAD_REQUEST, HTTP_NOT_FOUND, DAVError, get_http_status_string
from wsgidav.xml_tools import etree, make_multistatus_el, string_to_xml

from .. import paths

if TYPE_CHECKING:
    from ..vfs import Entry
    from .provider import UserFSProvider

# Headers that make wsgidav evaluate conditions against the resource: its way, not ours.
_CONDITIONAL = ("HTTP_IF", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE",
                "HTTP_IF_UNMODIFIED_SINCE")
# What wsgidav's get_href leaves unquoted (Nautilus chokes on "%28").
_HREF_SAFE = "/!*'(),$-_|."
_OK = "HTTP/1.1 200 OK"
_NOT_FOUND = "HTTP/1.1 " + get_http_status_string(HTTP_NOT_FOUND)

_COLLECTION = "<D:resourcetype><D:collection/></D:resourcetype>"
_SUPPORTED_LOCK = ("<D:supportedlock><D:lockentry><D:lockscope><D:exclusive/></D:lockscope>"
                   "<D:locktype><D:write/></D:locktype></D:lockentry><D:lockentry><D:lockscope>"
                   "<D:shared/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockentry>"
                   "</D:supportedlock>")
_NO_LOCKS = "<D:lockdiscovery/>"
_LOCK_NAMES = ("{DAV:}lockdiscovery", "{DAV:}supportedlock")
_QUOTA_NAMES = ("{DAV:}quota-used-bytes", "{DAV:}quota-available-bytes")
# RFC 4918's element is propname; wsgidav 4.4 looks for "name" only (and then
# answers an empty list). Both ask for the names of all properties.
_PROPNAME = ("{DAV:}propname", "{DAV:}name")
# One 404 for every property a child lacks (wsgidav raises a new one each time).
_MISSING = DAVError(HTTP_NOT_FOUND)


class _Raw(str):
    """A property value that is already XML (the whole element), not text."""


def answer(provider: "UserFSProvider", environ: dict, start_response) -> list[bytes] | None:
    """The 207 answer to a PROPFIND, or None when wsgidav should answer it.

    Raises:
        DAVError: 404 for a missing resource, 400 for a bad body, 403 and the
            rest of the error table for what UserFS refuses.
    """
    depth = environ.get("HTTP_DEPTH")
    if depth not in ("0", "1") or any(name in environ for name in _CONDITIONAL):
        return None
    path = environ["PATH_INFO"]
    res = provider.get_resource_inst(path, environ)
    if res is None:
        raise DAVError(HTTP_NOT_FOUND, context_info=path)
    mode, names = _parse_request(environ)

    out = ['<?xml version=\'1.0\' encoding=\'UTF-8\'?>\n<D:multistatus xmlns:D="DAV:">']
    out.append(_resource_response(res, mode, names))
    if depth == "1" and res.is_collection:
        _Children(provider, res, mode, names).write(out)
    out.append("</D:multistatus>")
    body = "".join(out).encode("utf-8")
    start_response("207 Multi-Status", [("Content-Type", "application/xml; charset=utf-8"),
                                        ("Date", util.get_rfc1123_time()),
                                        ("Content-Length", str(len(body)))])
    return [body]


def propname_for_wsgidav(environ: dict) -> None:
    """Rewrite a `<D:propname/>` request body as the `<D:name/>` wsgidav reads, for its own PROPFIND.

    The body is already buffered (guard.py caps and checks XML bodies); one
    that does not parse is left for wsgidav to refuse.
    """
    body = environ.get("wsgi.input")
    if not isinstance(body, io.BytesIO) or b"propname" not in body.getvalue():
        return      # no body, or none to rewrite: not parsed a second time
    try:
        request = util.parse_xml_body(environ, allow_empty=True)
    except DAVError:
        request = None
    finally:
        environ["wsgi.input"].seek(0)
    if request is None or request.tag != "{DAV:}propfind":
        return
    nodes = [node for node in request if node.tag == "{DAV:}propname"]
    if not nodes:
        return
    for node in nodes:
        node.tag = "{DAV:}name"
    body = etree.tostring(request, encoding="utf-8")
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


def _parse_request(environ: dict) -> tuple[str, list[str]]:
    """("allprop" | "name" | "named", the names asked for), as wsgidav's do_PROPFIND reads the body."""
    request = util.parse_xml_body(environ, allow_empty=True)
    if request is None:
        return "allprop", []
    if request.tag != "{DAV:}propfind":
        raise DAVError(HTTP_BAD_REQUEST)
    mode = None
    names: list[str] = []
    for node in request:
        if node.tag == "{DAV:}allprop":
            if mode:
                raise DAVError(HTTP_BAD_REQUEST)
            mode = "allprop"
        elif node.tag in _PROPNAME:
            if mode:
                raise DAVError(HTTP_BAD_REQUEST)
            mode = "name"
        elif node.tag == "{DAV:}prop":
            if mode not in (None, "named"):
                raise DAVError(HTTP_BAD_REQUEST)
            mode = "named"
            names.extend(child.tag for child in node)
    # A propfind element with none of the three: wsgidav asks for the named list (empty).
    return mode or "named", names


def _response(href: str, props: list[tuple[str, object]]) -> str:
    """One child's <D:response>, laid out as wsgidav's util.add_property_response lays it out.

    A value is text, None (an empty element), _Raw XML, or _MISSING (an
    empty element in the 404 propstat).
    """
    prefixes: dict[str, str] = {}
    by_status: dict[str, list[str]] = {}
    for name, value in props:
        if value is _MISSING:
            status, value = _NOT_FOUND, None
        else:
            status = _OK
        if isinstance(value, _Raw):
            # Written whole; only a name outside DAV: needs its namespace declared.
            if not name.startswith("{DAV:}"):
                _tag(name, prefixes)
            by_status.setdefault(status, []).append(value)
            continue
        tag = _tag(name, prefixes)
        if value is None:
            element = f"<{tag}/>"
        else:
            element = f"<{tag}>{escape(str(value))}</{tag}>"
        by_status.setdefault(status, []).append(element)
    declarations = "".join(f' xmlns:{prefix}="{escape(ns, {chr(34): "&quot;"})}"'
                           for ns, prefix in prefixes.items())
    parts = [f"<D:response{declarations}><D:href>{escape(href)}</D:href>"]
    for status, elements in by_status.items():
        parts.append(f"<D:propstat><D:prop>{''.join(elements)}</D:prop><D:status>{status}</D:status></D:propstat>")
    parts.append("</D:response>")
    return "".join(parts)


def _resource_response(res, mode: str, names: list[str]) -> str:
    """The <D:response> of one wsgidav resource, asked and written by wsgidav itself."""
    props = res.get_properties(mode, name_list=names if mode == "named" else None)
    multistatus = make_multistatus_el()
    util.add_property_response(multistatus, res.get_href(), props)
    # Written inside its multistatus, the response is byte for byte wsgidav's.
    text = etree.tostring(multistatus, encoding="unicode")
    return text[text.index(">") + 1:text.rindex("<")]


def _tag(name: str, prefixes: dict[str, str]) -> str:
    """The element name of a property in Clark notation; new namespaces get NS1, NS2, ..."""
    if name.startswith("{DAV:}"):
        return "D:" + name[6:]
    if not name.startswith("{") or "}" not in name:
        return name
    ns, _, local = name[1:].partition("}")
    if not ns:
        return local
    prefix = prefixes.get(ns)
    if prefix is None:
        prefix = prefixes[ns] = f"NS{len(prefixes) + 1}"
    return f"{prefix}:{local}"


def _element_xml(element) -> str:
    # Serialized on its own, an element carries the namespace declarations it uses.
    return etree.tostring(element, encoding="unicode", with_tail=False)


class _Children:
    """The members of one folder, each answered from its listing entry."""

    def __init__(self, provider: "UserFSProvider", folder, mode: str, names: list[str]) -> None:
        self.provider = provider
        self.folder = folder
        self.mode = mode
        self.names = names
        self.environ = folder.environ
        self.config = self.environ.get("wsgidav.config")
        self._dates: dict[int, str] = {}
        self._types: dict[str, _Raw] = {}
        ref = folder.get_ref_url()
        self.prefix = ref.rstrip("/") + "/"
        # One query each for the whole folder; a location's dead properties
        # are sorted by name, as the store answers them one location at a time.
        pm, lm = provider.prop_manager, provider.lock_manager
        self.dead = pm.properties_below(ref) if pm is not None and hasattr(pm, "properties_below") else None
        storage = getattr(lm, "storage", None)
        self.locked = storage.lock_roots_below(ref) if hasattr(storage, "lock_roots_below") else None

    def write(self, out: list[str]) -> None:
        folder, provider = self.folder, self.provider
        base_path = folder.path.rstrip("/") + "/"
        base_vpath = folder.vpath.rstrip("/") + "/"
        href_base = quote(provider.mount_path + provider.share_path + base_path, safe=_HREF_SAFE)
        # A member's state is keyed under the folder's location, except for a
        # mount point's (its own location): no per-member lookup of where it is.
        mount_points = {name for parent, name in (paths.split(m.path) for m in folder.fs.user.mounts)
                        if parent == folder.vpath}
        for entry in folder._entries():
            child_path = base_path + entry.name
            vpath = base_vpath + entry.name   # _entries() left out the names no path can carry
            ref = self.prefix + quote(entry.name)
            if self.dead is None or self.locked is None or ref in self.locked or entry.name in mount_points:
                # A lock of its own (lockdiscovery names its root), or a mount
                # point (state under another location): ask the resource.
                res = provider.make_resource(child_path, self.environ, folder.fs, vpath, entry)
                out.append(_resource_response(res, self.mode, self.names))
                continue
            href = href_base + quote(entry.name, safe=_HREF_SAFE) + ("/" if entry.is_dir else "")
            out.append(_response(href, self._properties(entry, child_path, self.dead.get(ref, ()))))

    def _properties(self, entry: "Entry", path: str, dead) -> list[tuple[str, object]]:
        if self.mode == "named":
            dead_values = dict(dead)
            return [(name, self._value(name, entry, path, dead_values)) for name in self.names]
        names = ["{DAV:}resourcetype"]
        if not entry.is_dir:
            names += ["{DAV:}getcontentlength", "{DAV:}getcontenttype"]
        elif self.mode == "name":
            used, free = self.folder._usage()
            names += [n for n, v in zip(_QUOTA_NAMES, (used, free)) if v is not None]
        if entry.mtime is not None:
            names.append("{DAV:}getlastmodified")
        names.append("{DAV:}displayname")
        if not entry.is_dir:
            names.append("{DAV:}getetag")
        names += _LOCK_NAMES
        names += [name for name, _ in dead]
        if self.mode == "name":
            return [(name, None) for name in names]
        dead_values = dict(dead)
        return [(name, self._value(name, entry, path, dead_values)) for name in names]

    def _value(self, name: str, entry: "Entry", path: str, dead: dict[str, bytes]):
        """What wsgidav's get_property_value gives for a resource without a lock of its own."""
        is_file = not entry.is_dir
        # The common ones are written here whole: their tags need no namespace.
        if name == "{DAV:}resourcetype":
            return _Raw("<D:resourcetype></D:resourcetype>" if is_file else _COLLECTION)
        if name == "{DAV:}getcontentlength":
            return _Raw(f"<D:getcontentlength>{entry.size}</D:getcontentlength>") if is_file else _MISSING
        if name == "{DAV:}getcontenttype":
            return self._content_type(entry.name) if is_file else _MISSING
        if name == "{DAV:}getlastmodified":
            if entry.mtime is None:
                return _MISSING
            return _Raw(f"<D:getlastmodified>{self._date(entry.mtime)}</D:getlastmodified>")
        if name == "{DAV:}displayname":
            return _Raw(f"<D:displayname>{escape(entry.name)}</D:displayname>")
        if name == "{DAV:}getetag":
            if is_file:
                return _Raw(f"<D:getetag>{escape(entry.etag or f'{entry.size:x}-{int(entry.mtime * 1000):x}')}"
                            f"</D:getetag>")
            return _MISSING
        if name == "{DAV:}lockdiscovery":
            return _Raw(_NO_LOCKS)
        if name == "{DAV:}supportedlock":
            return _Raw(_SUPPORTED_LOCK)
        if name in _QUOTA_NAMES:
            # A file has no quota: wsgidav answers 200 with an empty element.
            if is_file:
                return None
            used, free = self.folder._usage()
            value = used if name == _QUOTA_NAMES[0] else free
            return None if value is None else str(value)
        if name.startswith("{DAV:}"):
            return _MISSING   # creationdate (we keep none) and unknown live names
        value = dead.get(name)
        if value is None:
            return _MISSING
        return _Raw(_element_xml(string_to_xml(value)))

    def _content_type(self, name: str) -> _Raw:
        """getcontenttype as wsgidav's guess_mime_type gives it, asked once per suffix.

        mimetypes reads only the suffixes of the last segment (".tar.gz"),
        where leading dots do not count: "/x" + those suffixes gets the same answer.
        """
        bare = name.lstrip(".")
        dot = bare.find(".")
        key = "/x" + (bare[dot:] if dot >= 0 else "")
        found = self._types.get(key)
        if found is None:
            found = self._types[key] = _Raw(f"<D:getcontenttype>{escape(util.guess_mime_type(key, self.config))}"
                                            f"</D:getcontenttype>")
        return found

    def _date(self, mtime: float) -> str:
        # RFC 1123 has whole seconds: the files of one folder share few of them.
        second = int(mtime) if mtime >= 0 else None
        text = self._dates.get(second) if second is not None else None
        if text is None:
            text = util.get_rfc1123_time(mtime)
            if second is not None:
                self._dates[second] = text
        return text
