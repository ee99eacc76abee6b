"""cheroot on a listening socket that the supervisor bound once and every worker process shares,
and its TLS certificate reloaded on SIGHUP."""
from __future__ import annotations

import logging
import socket

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

log = logging.getLogger(__name__)


class SharedListenerServer(wsgi.Server):
    """cheroot's WSGI server; with `shared_socket` set it accepts there instead of binding.

    Every worker process accepts on the same socket, so each must take a
    connection another worker won (EAGAIN) in its stride, and must not wake
    its own accept() by connecting to the port as cheroot's stop() does.
    """

    shared_socket: socket.socket | None = None

    def bind(self, family, type, proto=0):
        """Create and bind the listening socket, or take the shared one."""
        if self.shared_socket is None:
            return super().bind(family, type, proto)
        sock = self.shared_socket
        if self.nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
            # As cheroot's own bind does: accepted sockets inherit it. Without it a
            # response written in two parts (201 headers, then body) waits for the
            # client's delayed ACK: 40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_adapter is not None:
            sock = self.ssl_adapter.bind(sock)
        self.socket = sock
        self.bind_addr = self.resolve_real_bind_addr(sock)
        return sock

    def prepare(self) -> None:
        super().prepare()
        if self.shared_socket is not None:
            # Every worker's selector wakes up for a new connection and one wins
            # it: the others must get EAGAIN at once (cheroot then moves on), not
            # wait in accept() while their own connections' requests queue up.
            self.socket.settimeout(0)

    def stop(self) -> None:
        if self.shared_socket is not None and self.ready:
            # cheroot's stop() wakes its accept() with a connection to its own
            # port, which another worker would accept. Stop the selector loop
            # (it wakes up by its own timeout) and close our copy of the
            # listening socket first, so cheroot finds no socket to touch.
            self._connections.stop()
            sock, self.socket = self.socket, None
            if sock is not None:
                sock.close()
        super().stop()


def reload_tls(old, new, name: str) -> BuiltinSSLAdapter | None:
    """A TLS adapter with the certificate and key of section `new`, if TLS was on and stays on.

    Turning TLS on or off changes what clients must speak: that waits for a
    restart (logged). Raises OSError or ssl.SSLError when the files do not load.
    """
    if (old.tls_cert is None) != (new.tls_cert is None):
        log.warning("SIGHUP: [%s] tls_cert turned TLS %s: that needs a restart", name,
                    "on" if new.tls_cert is not None else "off")
        return None
    if new.tls_cert is None:
        return None
    return BuiltinSSLAdapter(str(new.tls_cert), str(new.tls_key or new.tls_cert))
