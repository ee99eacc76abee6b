"""The WebDAV front-end: wsgidav over UserFS, served by cheroot in a background thread."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cheroot.ssl.builtin import BuiltinSSLAdapter
from wsgidav.http_authenticator import HTTPAuthenticator
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from ..proxy_protocol import ProxyProtocol
from ..shared_listener import reload_tls
from .auth import GatewayDomainController
from .dir_browser import DirBrowser
from .error_page import ErrorPages
from .guard import RequestGuard, front_door
from .http import make_server
from .inflight import InFlight, UserShare, busy
from . import lazy_debug
from ..errors import GatewayError
from .provider import MACOS_PATTERNS, UserFSProvider
from .state import LockLimits, import_legacy_state, open_state

if TYPE_CHECKING:
    from ..fairness import Fairness
    from ..server import Gateway
    from ..sessions import SessionRegistry

log = logging.getLogger(__name__)

# Where earlier versions kept locks and properties; imported into the store once.
LEGACY_STATE_FILE = "webdav.sqlite"
MACOS_OPTIONS = ("allow", "hide", "refuse")


def keep_alive_limit(threads: int, max_connections: int) -> int | None:
    """How many idle keep-alive connections cheroot keeps open (None: no limit).

    cheroot's default of 10 answered `Connection: close` to every request of
    the 11th concurrent client: a TCP (and TLS) handshake per request, and
    sockets piling up in TIME_WAIT. An idle connection costs a socket, not a
    thread, so the bound is the connections the defender admits at once
    (defender.max_connections, 0 for no limit), never fewer than the threads.
    """
    return max(threads, max_connections) if max_connections else None


class WebDAVServer:
    """FrontEnd for WebDAV: `start()` binds and serves in a thread, `stop()` joins it."""

    name = "webdav"

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.section = gateway.config.webdav
        if self.section.macos_files not in MACOS_OPTIONS:
            raise ValueError(f"[webdav] macos_files: expected one of {', '.join(MACOS_OPTIONS)}, "
                             f"got {self.section.macos_files!r}")
        self.address: tuple[str, int] = (self.section.listen.host, self.section.listen.port)
        self._server = None
        self._thread: threading.Thread | None = None
        self._lock_storage = None
        self._prop_manager = None
        self._requests = _RequestCount(gateway.fairness)
        self.inflight = InFlight(self.section.max_requests_per_ip, self.section.max_requests_per_user,
                                 self.section.threads)

    def _open_fs(self, user, client_ip: str):
        # Each request in flight is a session: revoking the user stops its
        # transfer at the next chunk (the UserFS refuses), and the request's
        # end closes it (`_closing_sessions`).
        session = self.gateway.open_session(user, "webdav", client_ip)
        try:
            return self.gateway.open_fs(user, "webdav", client_ip, session=session)
        except BaseException:
            # No file system, so the request's end cannot find the session to close it.
            self.gateway.sessions.close(session)
            raise

    def _storage_key(self, user_name: str, path: str) -> str | None:
        """The storage-location key of a path in a user's tree (None: no such user, or a bad path)."""
        user = self.gateway.users.get(user_name)
        if user is None:
            return None
        try:
            fs = self.gateway.open_fs(user, "webdav")
            return UserFSProvider.ref_url(fs, fs.normalize(path))
        except GatewayError:
            return None

    def build_app(self):
        """The WSGI application: wsgidav with our provider, auth, state and checks."""
        section = self.section
        store = self.gateway.store
        lazy_debug.install()
        imported = import_legacy_state(self.gateway.state_dir / LEGACY_STATE_FILE, store, self._storage_key)
        if imported is not None:
            log.info("imported %d WebDAV locks and properties from %s into the store %s", imported,
                     self.gateway.state_dir / LEGACY_STATE_FILE, store.url)
        self._lock_storage, self._prop_manager = open_state(
            store, LockLimits(max_timeout=section.max_lock_timeout, max_owner_bytes=section.max_lock_owner_bytes,
                              max_per_resource=section.max_locks_per_resource,
                              max_per_user=section.max_locks_per_user),
            section.max_property_bytes_per_user)
        provider = UserFSProvider(self._open_fs, section.macos_files,
                                  max_properties=section.max_properties,
                                  max_property_bytes=section.max_property_bytes)
        ignore = list(MACOS_PATTERNS) if section.macos_files != "allow" else []
        config = {
            "provider_mapping": {"/": provider},
            "http_authenticator": {
                "domain_controller": GatewayDomainController,
                "accept_basic": True,
                # Digest needs a plaintext-equivalent secret per user; we keep only hashes.
                "accept_digest": False,
                "default_to_digest": False,
                "trusted_auth_header": None,
            },
            "gateway": {"auth": self.gateway.auth, "max_xml_body": section.max_xml_body,
                        "macos_files": section.macos_files, "inflight": self.inflight},
            "lock_storage": self._lock_storage,
            "property_manager": self._prop_manager,
            "middleware_stack": [ErrorPages, HTTPAuthenticator, UserShare, RequestGuard,
                                 DirBrowser, RequestResolver],
            "block_size": section.block_size,
            "verbose": 1,
            "logging": {"enable": False},
            "suppress_version_info": True,
            "add_header_MS_Author_Via": True,
            "hotfixes": {"re_encode_path_info": True, "emulate_win32_lastmod": False},
            "dir_browser": {"enable": True, "ignore": ignore, "icon": False, "davmount": False,
                            "davmount_links": False, "ms_sharepoint_support": False,
                            "libre_office_support": False, "response_trailer": "",
                            "show_user": True},
        }
        return front_door(_closing_sessions(WsgiDAVApp(config), self.gateway.sessions, self._requests,
                                            self.inflight),
                          self.gateway.defender)

    def start(self) -> None:
        section = self.section
        if section.tls_cert is None and not section.listen.is_loopback:
            log.warning("WebDAV on %s uses HTTP Basic authentication without TLS: passwords "
                        "cross the network in clear text; set [webdav] tls_cert and tls_key",
                        section.listen)
        app = self.build_app()
        defender = self.gateway.defender
        # Connections count against the defender's limits from accept to close;
        # a banned address still connects, to read its 403 (front_door).
        server = make_server((section.listen.host, section.listen.port), app,
                             threads=section.threads, timeout=section.timeout,
                             header_timeout=section.header_timeout,
                             max_header_size=section.max_header_size,
                             admit=lambda ip: defender.open_connection(ip, check_ban=False),
                             release=defender.close_connection,
                             sock=self.gateway.listeners.get(self.name),
                             min_rate=section.min_rate, rate_window=section.min_rate_window,
                             # Read per connection as it arrives: REMOTE_ADDR is the client it names.
                             proxy=ProxyProtocol.for_section(section, "webdav"))
        server.keep_alive_conn_limit = keep_alive_limit(section.threads,
                                                        self.gateway.config.defender.max_connections)
        if section.tls_cert is not None:
            server.ssl_adapter = BuiltinSSLAdapter(str(section.tls_cert),
                                                   str(section.tls_key or section.tls_cert))
        try:
            server.prepare()
        except BaseException:
            self._close_state()
            raise
        self._server = server
        host, port = server.bind_addr[:2]
        self.address = (host, port)
        self._thread = threading.Thread(target=server.serve, name="webdav-serve", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """SIGTERM drain: refuse new connections, keep serving the requests under way."""
        if self._server is not None:
            self._server.stop_accepting()

    def reload(self, config) -> Callable[[], None]:
        """SIGHUP: header and keep-alive limits and the TLS certificate; returns the step that applies them.

        New connections get them; the rest of `[webdav]` needs a restart.
        Raises OSError or ssl.SSLError for a certificate that cannot be loaded.
        """
        server, new = self._server, config.webdav
        adapter = reload_tls(self.section, new, "webdav")
        keep_alive = keep_alive_limit(self.section.threads, config.defender.max_connections)

        def apply() -> None:
            if server is None:
                return
            server.header_timeout = new.header_timeout
            server.max_request_header_size = new.max_header_size
            server.keep_alive_conn_limit = keep_alive
            if adapter is not None:
                # cheroot wraps each accepted socket with the adapter it finds then.
                server.ssl_adapter = adapter
        return apply

    def in_flight(self) -> dict[str, int]:
        """What a drain waits for: requests whose response is not done yet (uploads and downloads)."""
        return {"webdav requests": self._requests.value}

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close_state()

    def _close_state(self) -> None:
        if self._lock_storage is not None:
            self._lock_storage.close()
            self._lock_storage = self._prop_manager = None


class _RequestCount:
    """Requests from the moment the application is called until their response body is closed.

    They are the interactive work SFTP's bulk packets make room for (gateway/fairness.py).
    """

    def __init__(self, fairness: "Fairness") -> None:
        self._lock = threading.Lock()
        self.value = 0
        self._fairness = fairness

    def add(self, delta: int) -> None:
        with self._lock:
            self.value += delta
        if delta > 0:
            self._fairness.begin_interactive()
        else:
            self._fairness.end_interactive()


class _ClosingBody:
    """A response body that closes the request's session when the server closes the body."""

    def __init__(self, body, close_session) -> None:
        self._body = body
        self._close_session = close_session

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._close_session()


def _closing_sessions(app, sessions: "SessionRegistry", requests: _RequestCount, inflight: InFlight):
    """Wrap the wsgidav app so the session a request opened is closed when the response is done.

    `requests` counts the requests in between (cheroot closes every body it got);
    `inflight` admits them by client address first, and its counts (the user's
    too) are given back then.
    """

    def close_session(environ: dict) -> None:
        try:
            fs = environ.get("gateway.fs")
            if fs is not None and fs.session is not None:
                sessions.close(fs.session)
        finally:
            inflight.leave(environ)
            requests.add(-1)

    def wrapped(environ: dict, start_response):
        if not inflight.enter_address(environ):
            return busy(start_response, "address")
        requests.add(1)
        try:
            body = app(environ, start_response)
        except BaseException:
            close_session(environ)
            raise
        return _ClosingBody(body, lambda: close_session(environ))

    return wrapped


def create_server(gateway: "Gateway") -> WebDAVServer:
    """The front-end contract: build, do not bind yet."""
    return WebDAVServer(gateway)
