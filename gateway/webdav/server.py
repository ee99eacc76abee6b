"""The WebDAV front-end: wsgidav over UserFS, served by cheroot in a background thread."""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cheroot.ssl.builtin import BuiltinSSLAdapter
from wsgidav.dir_browser import WsgiDavDirBrowser
from wsgidav.error_printer import ErrorPrinter
from wsgidav.http_authenticator import HTTPAuthenticator
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from ..proxy_protocol import ProxiedListener, ProxyProtocol
from .auth import GatewayDomainController
from .guard import RequestGuard, front_door
from .http import make_server
from .provider import MACOS_PATTERNS, UserFSProvider
from .state import open_state

if TYPE_CHECKING:
    from ..server import Gateway

log = logging.getLogger(__name__)

STATE_FILE = "webdav.sqlite"
MACOS_OPTIONS = ("allow", "hide", "refuse")


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

    def _open_fs(self, user, client_ip: str):
        return self.gateway.open_fs(user, "webdav", client_ip)

    def build_app(self):
        """The WSGI application: wsgidav with our provider, auth, state and checks."""
        section = self.section
        self._lock_storage, self._prop_manager = open_state(self.gateway.state_dir / STATE_FILE)
        provider = UserFSProvider(self._open_fs, section.macos_files)
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
                        "macos_files": section.macos_files},
            "lock_storage": self._lock_storage,
            "property_manager": self._prop_manager,
            "middleware_stack": [ErrorPrinter, HTTPAuthenticator, RequestGuard,
                                 WsgiDavDirBrowser, RequestResolver],
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
        return front_door(WsgiDAVApp(config), self.gateway.defender)

    def start(self) -> None:
        section = self.section
        if section.tls_cert is None and not section.listen.is_loopback:
            log.warning("WebDAV on %s uses HTTP Basic authentication without TLS: passwords "
                        "cross the network in clear text; set [webdav] tls_cert and tls_key",
                        section.listen)
        app = self.build_app()
        server = make_server((section.listen.host, section.listen.port), app,
                             threads=section.threads, timeout=section.timeout)
        if section.tls_cert is not None:
            server.ssl_adapter = BuiltinSSLAdapter(str(section.tls_cert),
                                                   str(section.tls_key or section.tls_cert))
        try:
            server.prepare()
        except BaseException:
            self._close_state()
            raise
        proxy = ProxyProtocol.for_section(section, "webdav")
        if proxy is not None:
            # Below cheroot and TLS: REMOTE_ADDR is the client the PROXY header names.
            server.socket = ProxiedListener(server.socket, proxy)
        self._server = server
        host, port = server.bind_addr[:2]
        self.address = (host, port)
        self._thread = threading.Thread(target=server.serve, name="webdav-serve", daemon=True)
        self._thread.start()

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


def create_server(gateway: "Gateway") -> WebDAVServer:
    """The front-end contract: build, do not bind yet."""
    return WebDAVServer(gateway)
