"""The admin front-end: /healthz, /readyz, /metrics and the REST API (/api/v1) on their own listener.

It runs beside the WebDAV and SFTP front-ends (`[admin]`, loopback by
default) so a load balancer and Prometheus never need a user's credentials.
`[admin] api = false` leaves the REST API out; `allow_networks` limits it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from .. import metrics
from ..proxy_protocol import parse_networks
from ..shared_listener import reload_tls
from ..webdav.http import make_server
from .api import AdminApi
from .health import Readiness
from .router import Request, Response, Router, json_response

if TYPE_CHECKING:
    from ..server import Gateway

log = logging.getLogger(__name__)

# Health checks, scrapes and API calls are small and short; a few threads serve them.
_THREADS = 4
_MAX_HEADER_BYTES = 64 * 1024


class AdminServer:
    """FrontEnd for the admin listener: `start()` binds and serves in a thread, `stop()` joins it."""

    name = "admin"

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.section = gateway.config.admin
        self.address: tuple[str, int] = (self.section.listen.host, self.section.listen.port)
        self.readiness = Readiness()
        for name, probe in gateway.readiness_probes().items():
            self.readiness.add(name, probe)
        self._server: wsgi.Server | None = None
        self._thread: threading.Thread | None = None
        self._api: AdminApi | None = None

    def build_app(self) -> Router:
        router = Router()
        router.add("/healthz", "GET", self.healthz)
        router.add("/readyz", "GET", self.readyz)
        router.add("/metrics", "GET", self.metrics)
        if self.section.api:
            self._api = AdminApi(self.gateway)
            self._api.install(router)
        return router

    # -- handlers ---------------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    def readyz(self, request: Request) -> Response:
        reasons = self.readiness.reasons()
        if reasons:
            return json_response(503, {"status": "not ready", "reasons": reasons})
        return json_response(200, {"status": "ready"})

    def metrics(self, request: Request) -> Response:
        body, content_type = metrics.exposition(metrics.registry())
        return Response(200, body, content_type)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        section = self.section
        if section.tls_cert is None and not section.listen.is_loopback:
            log.warning("the admin listener on %s has no TLS; set [admin] tls_cert and tls_key "
                        "or keep it on a loopback address", section.listen)
        # WebDAV's server: headers and the TLS handshake are waited for in its
        # selector without blocking, so a stalled client cannot hold up health
        # checks. In a worker process it accepts on the listener the supervisor
        # bound for all of them.
        server = make_server((section.listen.host, section.listen.port), self.build_app(),
                             threads=_THREADS, timeout=10, header_timeout=10,
                             max_header_size=_MAX_HEADER_BYTES, sock=self.gateway.listeners.get(self.name),
                             name="admin", protocol=None)
        if section.tls_cert is not None:
            server.ssl_adapter = BuiltinSSLAdapter(str(section.tls_cert), str(section.tls_key))
        server.prepare()
        self._server = server
        self.address = server.bind_addr[:2]
        self._thread = threading.Thread(target=server.serve, name="admin-serve", daemon=True)
        self._thread.start()

    def reload(self, config) -> Callable[[], None]:
        """SIGHUP: the TLS certificate and key for new connections, and the REST API's
        allow_networks (`api` itself waits for a restart); returns the step that applies them."""
        server, api = self._server, self._api
        adapter = reload_tls(self.section, config.admin, "admin")
        networks = parse_networks(config.admin.allow_networks)

        def apply() -> None:
            if server is not None and adapter is not None:
                server.ssl_adapter = adapter
            if api is not None:
                api.networks = networks
        return apply

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.readiness.join(self.readiness.timeout)


def create_server(gateway: "Gateway") -> AdminServer:
    """The front-end contract: build, do not bind yet."""
    return AdminServer(gateway)
