"""cheroot adjusted so that a refused request body is never read and slow clients hold no thread.

Stock cheroot answers `Expect: 100-continue` before the application runs, and
after an early response (401, 403, 413) it reads whatever body is left in one
`read()` call, into memory. Here `100 Continue` goes out only when the
application first reads the body (PEP 3333's second option), and a response
sent while body bytes are still unread closes the connection instead.

Stock cheroot also hands every accepted connection to a worker thread, which
then waits for the request headers: a few clients trickling header lines hold
every thread. Here `HeaderGate` collects the headers in the connection
manager's selector thread, within a size cap and a deadline, and a worker sees
a connection only once its headers are complete. Connections are counted
against the defender's limits when they are accepted, for their whole life.

Stock cheroot also does the TLS handshake in that selector thread, blocking,
for up to the socket timeout: one client that opens a connection and sends
half a ClientHello stalled every other connection for a minute. Here the
handshake is non-blocking too, driven by the same selector within the same
deadline as the headers. So is the PROXY protocol header of a load balancer
in front (`proxy_protocol`): read before the handshake, as it arrives; the
connection counts against the limits of the client it names once it is read.
"""
from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable

from cheroot import connections
from cheroot import server as cheroot_server
from cheroot import wsgi

from .. import metrics
from ..proxy_protocol import ProxyHeaderError, ProxyProtocol, parse_header, read_available
from ..shared_listener import SharedListenerServer
from .body import direct_socket, read_body_into
from .pace import Pace, PacedSocket

log = logging.getLogger(__name__)

_CONTINUE_SUFFIX = b" 100 Continue\r\n\r\n"


class _ContinueCatcher:
    """Stands in for the connection's writer while headers are read; holds back `100 Continue`."""

    def __init__(self, wfile) -> None:
        self._wfile = wfile
        self.caught = False

    def write(self, data: bytes) -> int:
        if data.endswith(_CONTINUE_SUFFIX) and data.startswith(b"HTTP/"):
            self.caught = True
            return len(data)
        return self._wfile.write(data)

    def __getattr__(self, name: str):
        return getattr(self._wfile, name)


class DeferredContinueRequest(cheroot_server.HTTPRequest):
    """An HTTPRequest that owes the client `100 Continue` until the body is first read."""

    continue_pending = False

    def read_request_headers(self) -> bool:
        real = self.conn.wfile
        catcher = _ContinueCatcher(real)
        self.conn.wfile = catcher
        try:
            return super().read_request_headers()
        finally:
            self.conn.wfile = real
            self.continue_pending = catcher.caught

    def send_continue(self) -> None:
        if self.continue_pending and not self.sent_headers:
            self.continue_pending = False
            self.conn.wfile.write(self.server.protocol.encode("ascii") + _CONTINUE_SUFFIX)

    def body_unread(self) -> bool:
        rfile = getattr(self, "rfile", None)
        if rfile is None:
            return False
        if self.chunked_read:
            return not getattr(rfile, "closed", True)
        return getattr(rfile, "remaining", 0) > 0


class DeferredContinueConnection(cheroot_server.HTTPConnection):
    """A client connection, counted in the metrics from accept to close."""

    RequestHandlerClass = DeferredContinueRequest

    # Set by HeaderGate: the address counted for this connection, the header
    # bytes collected so far (None between requests), and their deadline.
    client_ip: str | None = None
    header_buffer: bytearray | None = None
    header_deadline = 0.0
    # Set by HeaderGate on a TLS connection until its handshake is done: the
    # adapter that wrapped it, and whether its first byte was TLS.
    tls_adapter = None
    tls_started = False
    # Set by HeaderGate behind a load balancer (proxy_protocol) until the PROXY
    # header is read: its bytes so far, and the monotonic time of the accept.
    proxy_header: bytearray | None = None
    accepted_at = 0.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        server = self.server
        # Below cheroot's reader and writer (the SocketIO they read and write
        # through): body reads and response writes keep the minimum rate.
        self.pace = Pace(self.socket, server.min_rate, server.rate_window, server.timeout)
        for stream in (self.rfile, self.wfile):
            raw = getattr(stream, "raw", None)
            if isinstance(raw, socket.SocketIO):
                raw._sock = PacedSocket(raw._sock, self.pace)
        label = server.metrics_label
        self._counted = label is not None
        if label is not None:
            metrics.CONNECTIONS.labels(label).inc()
            metrics.CONNECTIONS_OPEN.labels(label).inc()

    def close(self) -> None:
        try:
            super().close()
        finally:
            ip, self.client_ip = self.client_ip, None
            if ip is not None:
                self.server.release_connection(ip)
            # cheroot may close a connection more than once.
            if getattr(self, "_counted", False):
                self._counted = False
                metrics.CONNECTIONS_OPEN.labels(self.server.metrics_label).dec()


class _RequestBody:
    """wsgi.input: sends the owed `100 Continue` on the first read, then reads through."""

    def __init__(self, req: DeferredContinueRequest) -> None:
        self._req = req
        self._rfile = req.rfile
        sock = direct_socket(req)
        pace = getattr(req.conn, "pace", None)
        self._socket = PacedSocket(sock, pace) if sock is not None and pace is not None else sock

    @property
    def direct(self) -> bool:
        """True when readinto() reads the socket itself (plain HTTP, Content-Length)."""
        return self._socket is not None

    def read(self, size: int | None = None) -> bytes:
        self._req.send_continue()
        return self._rfile.read(size)

    def readinto(self, buffer: memoryview) -> int:
        """Fill `buffer` with body bytes (fewer only at the end); 0 when the body is done."""
        self._req.send_continue()
        if self._socket is not None:
            return read_body_into(self._req, self._socket, buffer)
        data = self._rfile.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = None) -> bytes:
        self._req.send_continue()
        return self._rfile.readline(size)

    def readlines(self, hint: int = 0) -> list[bytes]:
        self._req.send_continue()
        return self._rfile.readlines(hint)

    def __iter__(self):
        self._req.send_continue()
        return iter(self._rfile)


class _HeldWrites:
    """Stands in for the connection's writer while a response's first chunk is prepared."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)


# A first body chunk up to this size leaves in the same send as the headers:
# one syscall (and one wake-up of the client) per small response instead of
# two. Larger chunks are not worth copying.
_COALESCE_BYTES = 65536

# environ key: the download stream a GET opened (UserFS's metered reader), set
# by the provider; the rest of its body may go out with sendfile.
DOWNLOAD = "gateway.download"


class GuardedGateway(wsgi.Gateway_10):
    """WSGI 1.0 gateway with the deferred body and close-on-early-response.

    A GET of a local file on plain HTTP sends its first block as wsgidav
    yields it (headers, status and ranges stay wsgidav's), and the rest of its
    Content-Length with sendfile: the bytes go from the page cache to the
    socket without passing through Python.
    """

    content_length: int | None = None

    def respond(self) -> None:
        # cheroot's respond, plus the hand-off to sendfile after the first chunk,
        # and the minimum transfer rate while the request is served.
        pace = getattr(self.req.conn, "pace", None)
        if pace is not None:
            pace.arm()
        try:
            self._respond()
        finally:
            if pace is not None:
                pace.disarm()

    def _respond(self) -> None:
        response = self.req.server.wsgi_app(self.env, self.start_response)
        try:
            written = 0
            for chunk in filter(None, response):
                if not isinstance(chunk, bytes):
                    raise ValueError("WSGI Applications must yield bytes")
                self.write(chunk)
                first = written == 0
                written += len(chunk)
                if first:
                    written += self._send_rest(written)
            length = self.content_length
            if (length is not None and written < length and self.env.get("REQUEST_METHOD") != "HEAD"
                    and not self.req.status.startswith((b"204", b"304"))):
                # A body shorter than its Content-Length (the file shrank while
                # it was read): the client would wait for the rest, or take the
                # next response for it. End the connection instead.
                log.warning("%r %r: the body ended %d bytes short of its Content-Length; closing the "
                            "connection", self.env.get("REQUEST_METHOD"), self.env.get("PATH_INFO", ""),
                            length - written)
                self.req.close_connection = True
        finally:
            self.req.ensure_headers_sent()
            if hasattr(response, "close"):
                response.close()

    def _send_rest(self, written: int) -> int:
        """Send the body after its first `written` bytes with sendfile when it is all one local file."""
        req, reader, length = self.req, self.env.get(DOWNLOAD), self.content_length
        if (reader is None or length is None or length <= written or req.chunked_write
                or not getattr(reader, "can_send", False)
                # The body so far is exactly what was read from this file.
                or reader.handed_out != written
                or not req.status.startswith((b"200", b"206"))
                # Plain TCP only: TLS needs the bytes in Python to encrypt them.
                or type(req.conn.socket) is not socket.socket):
            return 0
        req.conn.wfile.flush()
        # sendfile waits for the client within the socket's timeout: with the
        # minimum rate armed, that is its window (pace.py).
        return reader.send_to(req.conn.socket, length - written)

    def write(self, chunk: bytes) -> None:
        req = self.req
        if req.sent_headers or len(chunk) > _COALESCE_BYTES:
            return super().write(chunk)
        real, held = req.conn.wfile, _HeldWrites()
        req.conn.wfile = held
        try:
            super().write(chunk)
        finally:
            req.conn.wfile = real
            if held.parts:
                real.write(b"".join(held.parts))

    def get_environ(self) -> dict:
        env = super().get_environ()
        env["wsgi.input"] = _RequestBody(self.req)
        return env

    def start_response(self, status, headers, exc_info=None):
        self.content_length = next((int(value) for name, value in headers
                                    if name.lower() == "content-length" and value.isdigit()), None)
        req = self.req
        if isinstance(req, DeferredContinueRequest) and req.body_unread():
            # Answering before the body is read: close rather than let cheroot
            # drain (and buffer) a body we refused.
            req.close_connection = True
        return super().start_response(status, headers, exc_info)


_HEADER_END = (b"\r\n\r\n", b"\n\n")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 29\r\nConnection: close\r\n\r\nrequest headers are too large")
_PLAIN_ON_TLS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 37\r\n"
                 b"Connection: close\r\n\r\nthis port speaks HTTPS, not plain HTTP")


class _AdmittingSocket:
    """The listening socket as HeaderGate lets cheroot see it: accept() refuses over the limits."""

    def __init__(self, sock: socket.socket, admit: Callable[[str], bool], name: str,
                 proxy: ProxyProtocol | None = None) -> None:
        self._sock = sock
        self._admit = admit
        self._name = name
        self._proxy = proxy
        self.ip: str | None = None
        self.proxied = False

    def accept(self):
        sock, addr = self._sock.accept()
        ip = addr[0] if isinstance(addr, tuple) else ""
        if self._proxy is not None:
            # Security: only a trusted proxy may name another address; anyone
            # else could forge a header to dodge a ban or frame an innocent address.
            if not self._proxy.trusts(ip):
                self._proxy.refused(ip, "the peer is not in trusted_proxies")
                sock.close()
                raise BlockingIOError(errno.EAGAIN, "connection refused: not a trusted proxy")
            # Admitted (and counted) once its PROXY header names the client.
            self.proxied = True
            return sock, addr
        if not self._admit(ip):
            log.info("%s connection from %s refused: connection limit", self._name, ip)
            sock.close()
            # cheroot treats EAGAIN from accept() as "nothing to accept".
            raise BlockingIOError(errno.EAGAIN, "connection refused by limit")
        self.ip = ip
        return sock, addr


class _BelowTLS:
    """A socket's plain TCP recv, also for a TLS socket before its handshake (the PROXY header precedes it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, size: int) -> bytes:
        return socket.socket.recv(self._sock, size)


class HeaderGate(connections.ConnectionManager):
    """A ConnectionManager that admits connections by address and gives workers complete headers only.

    The selector thread reads what each waiting connection has sent without
    blocking. A connection goes to a worker once its header block is complete;
    one whose headers outgrow `max_request_header_size` gets 431 and is
    closed, one past its header deadline is closed. Workers therefore never
    wait for header bytes, however slowly clients send them.
    """

    server: "GatewayHTTPServer"

    def _from_server_socket(self, server_socket):
        if server_socket is None:
            # stop_accepting() closed the listener after select() saw a connection.
            return None
        listener = _AdmittingSocket(server_socket, self.server.admit_connection, self.server.name,
                                    self.server.proxy)
        try:
            if self.server.ssl_adapter is not None:
                conn = self._accept_tls(listener)
            else:
                conn = super()._from_server_socket(listener)
        except BaseException:
            if listener.ip is not None:
                self.server.release_connection(listener.ip)
            raise
        if conn is None:
            # Refused, or admitted and then lost in the TLS handshake.
            if listener.ip is not None:
                self.server.release_connection(listener.ip)
            return None
        conn.client_ip = listener.ip
        conn.last_used = time.time()
        conn.header_buffer = bytearray()
        conn.accepted_at = time.monotonic()
        conn.header_deadline = conn.accepted_at + self.server.header_timeout
        if listener.proxied:
            conn.proxy_header = bytearray()
            conn.header_deadline = conn.accepted_at + min(self.server.header_timeout, self.server.proxy.timeout)
        return conn

    def _proxy_header_done(self, conn) -> bool:
        """Read `conn`'s PROXY header as far as it has come, without blocking; True once it is read and admitted.

        False: it waits for more (registered for reading again), or it was
        refused (the connection is closed).
        """
        server, proxy, sock = self.server, self.server.proxy, conn.socket
        peer = conn.remote_addr or ""
        try:
            sock.setblocking(False)
            complete = read_available(_BelowTLS(sock), conn.proxy_header)
            named = parse_header(bytes(conn.proxy_header)) if complete else None
        except (ProxyHeaderError, OSError) as exc:
            proxy.refused(peer, f"trusted proxy sent no valid header: {exc}")
            conn.close()
            return False
        finally:
            try:
                sock.settimeout(server.timeout)
            except OSError:
                pass
        if not complete:
            self._selector.register(sock.fileno(), connections.selectors.EVENT_READ, data=conn)
            return False
        named = proxy.client_of(named, (peer, conn.remote_port))
        conn.proxy_header = None
        if not server.admit_connection(named[0]):
            log.info("%s connection from %s (through %s) refused: connection limit", server.name, named[0], peer)
            conn.close()
            return False
        conn.client_ip = named[0]
        conn.remote_addr, conn.remote_port = named
        conn.header_deadline = conn.accepted_at + server.header_timeout
        return True

    def _accept_tls(self, listener: "_AdmittingSocket"):
        """Accept a connection and wrap it for TLS without a handshake yet (headers_complete drives it)."""
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, socket.timeout):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return None   # as cheroot: the client left, or try again once descriptors free up
            raise
        connections.prevent_socket_inheritance(sock)
        adapter = self.server.ssl_adapter
        try:
            tls = adapter.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            return None
        conn = self.server.ConnectionClass(self.server, tls, adapter.makefile)
        if isinstance(addr, tuple) and len(addr) >= 2:
            conn.remote_addr, conn.remote_port = addr[0], addr[1]
        conn.ssl_env = {}
        conn.tls_adapter = adapter
        return conn

    def _handshake_done(self, conn) -> bool:
        """Advance `conn`'s TLS handshake without blocking; True once it is complete.

        False: it waits for the client (registered for reading again) or it
        failed (the connection is closed).
        """
        sock = conn.socket
        try:
            sock.setblocking(False)
            if not conn.tls_started:
                # A TLS record starts with a byte below 0x20; a plain HTTP request with its method.
                first = socket.socket.recv(sock, 1, socket.MSG_PEEK)
                if not first:
                    conn.close()
                    return False
                if first.isalpha():
                    log.info("%s connection from %s spoke plain HTTP to the TLS port", self.server.name,
                             conn.client_ip)
                    socket.socket.send(sock, _PLAIN_ON_TLS)   # below TLS, as the client speaks
                    conn.close()
                    return False
                conn.tls_started = True
            sock.do_handshake()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._selector.register(sock.fileno(), connections.selectors.EVENT_READ, data=conn)
            return False
        except ssl.SSLError as exc:
            log.info("%s connection from %s closed: TLS handshake failed: %s", self.server.name, conn.client_ip,
                     exc)
            conn.close()
            return False
        except OSError as exc:
            log.info("%s connection from %s closed during the TLS handshake: %s", self.server.name,
                     conn.client_ip, exc)
            conn.close()
            return False
        finally:
            try:
                sock.settimeout(conn.server.timeout)
            except OSError:
                pass
        conn.ssl_env = conn.tls_adapter.get_environ(sock)
        conn.tls_adapter = None
        return True

    def put(self, conn) -> None:
        """An idle keep-alive connection comes back: wait for its next request's headers."""
        conn.last_used = time.time()
        conn.header_buffer = None
        self.server.process_conn(conn)

    def headers_complete(self, conn) -> bool:
        """Read what `conn` has sent; True once a worker can parse its headers without waiting.

        Runs in the selector thread (and in a worker putting a connection
        back); every read is non-blocking. A connection that is closed here,
        or must wait for more bytes, is handled and False returned.
        """
        if conn.proxy_header is not None and not self._proxy_header_done(conn):
            return False
        if conn.tls_adapter is not None and not self._handshake_done(conn):
            return False
        rfile = conn.rfile
        fresh = conn.header_buffer is None
        buffer = bytearray() if fresh else conn.header_buffer
        # Bytes cheroot already buffered (a pipelined request) come first.
        # cheroot reads through the pure-Python _pyio.BufferedReader; its
        # buffer attributes are what cheroot's own has_data() looks at.
        if rfile._read_pos < len(rfile._read_buf):
            buffer += rfile._read_buf[rfile._read_pos:]
            rfile._read_buf, rfile._read_pos = b"", 0
        limit = self.server.max_request_header_size
        ended = self._read_available(conn, buffer, limit + 1)
        if any(end in buffer for end in _HEADER_END):
            rfile._read_buf, rfile._read_pos = bytes(buffer), 0
            conn.header_buffer = None
            return True
        if len(buffer) > limit:
            log.info("%s request from %s refused: headers over %d bytes", self.server.name, conn.client_ip,
                     limit)
            self._answer_and_close(conn, _TOO_LARGE)
            return False
        if ended:
            conn.close()
            return False
        if fresh and buffer:
            # A later request on a kept-alive connection: its deadline starts
            # with its first byte (until then cheroot's idle timeout applies).
            conn.header_buffer = buffer
            conn.header_deadline = time.monotonic() + self.server.header_timeout
        self._selector.register(conn.socket.fileno(), connections.selectors.EVENT_READ, data=conn)
        return False

    @staticmethod
    def _read_available(conn, buffer: bytearray, limit: int) -> bool:
        """Append what can be read now, up to `limit` bytes; True when the connection ended."""
        sock = conn.socket
        sock.setblocking(False)
        try:
            while len(buffer) < limit:
                chunk = sock.recv(min(65536, limit - len(buffer)))
                if not chunk:
                    return True
                buffer += chunk
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:
            return True
        finally:
            try:
                sock.settimeout(conn.server.timeout)
            except OSError:
                pass
        return False

    @staticmethod
    def _answer_and_close(conn, response: bytes) -> None:
        sock = conn.socket
        try:
            sock.setblocking(False)
            sock.send(response)
        except OSError:
            pass
        conn.close()

    def _expire(self, threshold: float) -> None:
        super()._expire(threshold)
        now = time.monotonic()
        late = [(fd, conn) for fd, conn in self._selector.connections
                if conn is not self.server and conn.header_buffer is not None
                and conn.header_deadline < now]
        for fd, conn in late:
            if conn.proxy_header is not None:
                self.server.proxy.refused(conn.remote_addr or "", "trusted proxy sent no complete header "
                                          "in time")
            else:
                log.info("%s connection from %s closed: no complete request headers within %ds",
                         self.server.name, conn.client_ip, self.server.header_timeout)
            self._selector.unregister(fd)
            conn.close()

    @property
    def can_add_keepalive_connection(self) -> bool:
        # Connections waiting for their first headers are not kept-alive ones.
        limit = self.server.keep_alive_conn_limit
        if limit is None or self._num_connections < limit:
            return True   # whatever is waiting, the keep-alive ones are fewer (no walk over all)
        waiting = sum(1 for _, conn in self._selector.connections
                      if conn is not self.server and conn.header_buffer is not None)
        return limit is None or self._num_connections - waiting < limit


class GatewayHTTPServer(SharedListenerServer):
    """cheroot's WSGI server with HeaderGate as its connection manager."""

    ConnectionClass = DeferredContinueConnection

    # The label of its connections in the metrics (None: not counted), and its name in the log.
    # (Not "protocol": cheroot's own attribute, "HTTP/1.1".)
    metrics_label: str | None = "webdav"
    name = "webdav"
    # Behind a load balancer: the PROXY protocol policy (None: off). HeaderGate reads the header.
    proxy: ProxyProtocol | None = None
    # Minimum transfer rate of bodies and responses (bytes/s over seconds of waiting; 0: none). See pace.py.
    min_rate = 0
    rate_window = 0.0

    def __init__(self, *args, admit: Callable[[str], bool], release: Callable[[str], None],
                 header_timeout: int, max_header_size: int,
                 shared_socket: socket.socket | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shared_socket = shared_socket
        self._admit = admit
        self._release = release
        self.header_timeout = header_timeout
        self.max_request_header_size = max_header_size

    draining = False

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already open keep being served (SIGTERM drain).

        Their responses say `Connection: close` from now on, so each client
        goes once its request is done.
        """
        self.draining = True
        sock, self.socket = self.socket, None
        if sock is None:
            return
        try:
            # The selector thread may be in select(): epoll allows removing a
            # descriptor meanwhile, and _from_server_socket copes with a late event.
            self._connections._selector.unregister(sock.fileno())
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    @property
    def can_add_keepalive_connection(self) -> bool:
        return not self.draining and super().can_add_keepalive_connection

    def admit_connection(self, ip: str) -> bool:
        return self._admit(ip)

    def release_connection(self, ip: str) -> None:
        self._release(ip)

    def prepare(self) -> None:
        super().prepare()
        stock, self._connections = self._connections, HeaderGate(self)
        stock._selector.close()

    def process_conn(self, conn) -> None:
        if self._connections.headers_complete(conn):
            super().process_conn(conn)


def make_server(bind: tuple[str, int], app, *, threads: int, timeout: int, header_timeout: int,
                max_header_size: int, admit: Callable[[str], bool] = lambda ip: True,
                release: Callable[[str], None] = lambda ip: None,
                sock: socket.socket | None = None, name: str = "webdav",
                protocol: str | None = "webdav", min_rate: int = 0,
                rate_window: float = 0.0, proxy: ProxyProtocol | None = None) -> wsgi.Server:
    """A cheroot WSGI server with the refinements above.

    `admit(ip)` decides at accept whether a connection may open (and counts
    it); `release(ip)` is called once when an admitted connection closes.
    With `sock` (a bound, listening socket that other worker processes share)
    the server accepts on it instead of binding `bind`. `name` goes in log
    lines; `protocol` labels its connections in the metrics (None: uncounted).
    A request whose body or response moves under `min_rate` bytes/s over
    `rate_window` seconds of waiting for the client is ended (pace.py; 0: never).
    With `proxy`, every connection must open with a PROXY header from a trusted
    peer; the client it names is the connection's address (REMOTE_ADDR, limits).
    """
    server = GatewayHTTPServer(bind, app, numthreads=threads, timeout=timeout,
                               server_name="gateway" if name == "webdav" else f"gateway-{name}",
                               request_queue_size=64, shutdown_timeout=5, admit=admit,
                               release=release, header_timeout=header_timeout,
                               max_header_size=max_header_size, shared_socket=sock)
    server.name, server.metrics_label = name, protocol
    server.min_rate, server.rate_window = min_rate, rate_window
    server.proxy = proxy
    server.gateway = GuardedGateway
    return server
