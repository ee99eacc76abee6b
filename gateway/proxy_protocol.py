"""PROXY protocol (v2 binary and v1 text) on freshly accepted sockets, for load balancers in front.

With `proxy_protocol = true` a peer outside `trusted_proxies` is refused, and
a trusted peer must open with a valid header. The header is read exactly, so
the bytes after it stay in the socket for cheroot or paramiko. A silent
trusted peer must hold up no one else: WebDAV reads the header without
blocking as it arrives (`read_available`, in cheroot's selector), SFTP in a
thread per connection (`ProxyProtocol.client_address`, which blocks).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A trusted proxy writes its header as soon as it connects; this only bounds a broken one.
HEADER_TIMEOUT = 5.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The v1 line is at most 107 bytes with its CRLF (the spec's worst case, TCP6 with long ports).
V1_MAX = 107
# v2 allows 64 KiB of addresses and TLVs; HAProxy sends well under 1 KiB even with SSL TLVs.
V2_MAX_PAYLOAD = 4096
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
# Peers already warned about; bounded so a scan of many addresses cannot grow it without end.
_WARNED_LIMIT = 4096


class ProxyHeaderError(Exception):
    """A PROXY header that is missing, incomplete, malformed or too large."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """IP addresses and CIDR networks ("10.0.0.5", "10.1.0.0/16", "::1") as networks.

    Raises:
        ValueError: naming the position and value of the first bad entry.
    """
    networks = []
    for index, value in enumerate(values):
        try:
            # strict: "10.0.0.1/8" is a typo for a host or for a network; refuse to guess.
            networks.append(ipaddress.ip_network(value, strict=True))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"[{index}]: {value!r} is not an IP address or network ({exc})") from None
    return tuple(networks)


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """True when the address `ip` lies in one of `networks` (an IPv4-mapped IPv6 address counts
    as its IPv4 address); False for anything that is not an address."""
    try:
        address = _canonical(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _canonical(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(ip)
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; bans and audit lines use a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly `size` bytes, never more, before `deadline` (time.monotonic)."""
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProxyHeaderError("no complete PROXY header in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise ProxyHeaderError("no complete PROXY header in time") from None
        except OSError as exc:
            raise ProxyHeaderError(f"connection failed while reading the PROXY header: {exc}") from None
        if not chunk:
            raise ProxyHeaderError("connection closed before a complete PROXY header")
        data += chunk
    return data


def header_bytes_wanted(data: bytes) -> int:
    """How many more bytes to read after `data` (the start of a connection) without passing the header's end.

    0 once `data` is a complete header. Reading exactly this many (or fewer)
    never takes a byte of the client's own stream: v2 says its length, and a
    v1 line is read a byte at a time until its CRLF.

    Raises:
        ProxyHeaderError: `data` cannot start a valid PROXY header, or is over its size limit.
    """
    if len(data) < len(V1_PREFIX):
        # Both versions are longer than 6 bytes ("PROXY UNKNOWN\r\n" is 15), so this never over-reads.
        if not (V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data)):
            raise ProxyHeaderError("connection does not start with a PROXY header")
        return len(V1_PREFIX) - len(data)
    if data.startswith(V1_PREFIX):
        if data.endswith(b"\r\n"):
            return 0
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return 1
    if data[:len(V2_SIGNATURE)] != V2_SIGNATURE[:len(data)]:
        raise ProxyHeaderError("connection does not start with a PROXY header")
    if len(data) < 16:
        return 16 - len(data)
    version, command = data[12] >> 4, data[12] & 0x0F
    (length,) = struct.unpack("!H", data[14:16])
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError(f"unsupported PROXY v2 version/command byte {data[12]:#04x}")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes is over the {V2_MAX_PAYLOAD} limit")
    return 16 + length - len(data)


def parse_header(header: bytes) -> Address | None:
    """The client a complete PROXY header (as `header_bytes_wanted` read it) names.

    Returns None when it names no client: a v2 LOCAL command (HAProxy's
    health checks), v1 UNKNOWN, or a v2 address family other than IPv4/IPv6.
    Then, as the specification says, the connection is served with the
    peer's own address.

    Raises:
        ProxyHeaderError: the header is malformed.
    """
    if header.startswith(V1_PREFIX):
        return _parse_v1(header)
    return _parse_v2(header)


def read_header(sock: socket.socket, timeout: float = HEADER_TIMEOUT) -> Address | None:
    """Read one PROXY header (v2 or v1) from the start of the blocking `sock`, and nothing after it.

    Blocks for up to `timeout` seconds: for a thread of the connection's own,
    never an accept loop (`read_available` is the non-blocking way).
    Returns what `parse_header` returns.

    Raises:
        ProxyHeaderError: the header is missing, malformed, too large, or not
            complete within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    data = b""
    while wanted := header_bytes_wanted(data):
        data += _recv_exact(sock, wanted, deadline)
    return parse_header(data)


def read_available(sock: socket.socket, header: bytearray) -> bool:
    """Append to `header` what the non-blocking `sock` has of its PROXY header now; True once complete.

    Never reads past the header, so the bytes after it (HTTP, a TLS
    ClientHello, an SSH banner) stay in the socket.

    Raises:
        ProxyHeaderError: the header is malformed or too large, or the connection ended first.
        OSError: from the socket.
    """
    while wanted := header_bytes_wanted(bytes(header)):
        try:
            chunk = sock.recv(wanted)
        except BlockingIOError:
            return False
        if not chunk:
            raise ProxyHeaderError("connection closed before a complete PROXY header")
        header += chunk
    return True


def _parse_v1(line: bytes) -> Address | None:
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {text[:V1_MAX]!r}")
    _, family, source, dest, source_port, dest_port = fields
    try:
        address = ipaddress.ip_address(source)
        ipaddress.ip_address(dest)
    except ValueError:
        raise ProxyHeaderError(f"malformed PROXY v1 address in {text!r}") from None
    if address.version != (4 if family == "TCP4" else 6):
        raise ProxyHeaderError(f"PROXY v1 {family} line with a different address family: {text!r}")
    for port in (source_port, dest_port):
        if not port.isdigit() or int(port) > 65535 or (len(port) > 1 and port[0] == "0"):
            raise ProxyHeaderError(f"malformed PROXY v1 port in {text!r}")
    return str(_canonical(source)), int(source_port)


def _parse_v2(header: bytes) -> Address | None:
    command = header[12] & 0x0F
    family, transport = header[13] >> 4, header[13] & 0x0F
    # The whole block (addresses and TLVs) was read even when it is not used: it is not the client's data.
    payload = header[16:]
    if command == 0:
        return None
    if family == 1:
        layout = _V2_INET
    elif family == 2:
        layout = _V2_INET6
    else:
        return None
    if transport != 1:
        raise ProxyHeaderError(f"PROXY v2 header for a non-stream transport ({transport})")
    if len(payload) < layout.size:
        raise ProxyHeaderError(f"PROXY v2 address block of {len(payload)} bytes is too short")
    source, _dest, source_port, _dest_port = layout.unpack_from(payload)
    return str(_canonical(str(ipaddress.ip_address(source)))), source_port


class ProxyProtocol:
    """The PROXY protocol policy of one front-end: whom to trust, and how long to wait."""

    def __init__(self, trusted: Iterable[str], name: str, timeout: float = HEADER_TIMEOUT) -> None:
        """Raises ValueError for an entry of `trusted` that is not an IP address or network."""
        self.networks = parse_networks(trusted)
        self.name = name
        self.timeout = timeout
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_section(cls, section: Any, name: str) -> "ProxyProtocol | None":
        """The policy for a [webdav] or [sftp] section, or None when proxy_protocol is off."""
        if not section.proxy_protocol:
            return None
        return cls(section.trusted_proxies, name)

    def trusts(self, ip: str) -> bool:
        return in_networks(ip, self.networks)

    def client_address(self, sock: socket.socket, peer: Address) -> Address | None:
        """The real client behind `peer`, read from its PROXY header.

        Returns None after closing `sock` when the peer is not a trusted
        proxy or sends no valid header; the first refusal per peer address is
        logged at WARNING, repeats at DEBUG (scanners must not fill the log).
        """
        ip = peer[0]
        # Security: only a trusted proxy may name another address; anyone else
        # could forge a header to dodge a ban or frame an innocent address.
        if not self.trusts(ip):
            self._refuse(sock, ip, "the peer is not in trusted_proxies")
            return None
        timeout = sock.gettimeout()
        try:
            client = read_header(sock, self.timeout)
            sock.settimeout(timeout)
        except (ProxyHeaderError, OSError) as exc:
            self._refuse(sock, ip, f"trusted proxy sent no valid header: {exc}")
            return None
        return self.client_of(client, peer)

    @staticmethod
    def client_of(named: Address | None, peer: Address) -> Address:
        """The client: the one a header named, else (LOCAL, UNKNOWN) the peer itself."""
        if named is None:
            return str(_canonical(peer[0])), peer[1]
        return named

    def refused(self, ip: str, reason: str) -> None:
        """Log a refused peer: the first refusal per address at WARNING, repeats at DEBUG."""
        with self._lock:
            first = ip not in self._warned
            if first:
                if len(self._warned) >= _WARNED_LIMIT:
                    self._warned.clear()
                self._warned.add(ip)
        log.log(logging.WARNING if first else logging.DEBUG,
                "%s connection from %s refused (proxy_protocol is on): %s", self.name, ip, reason)

    def _refuse(self, sock: socket.socket, ip: str, reason: str) -> None:
        self.refused(ip, reason)
        # Closed after logging, so the line is written by the time the peer sees the close.
        sock.close()


class ProxiedListener:
    """A listening socket whose accept() answers with the client named in the PROXY header.

    accept() blocks for up to the policy's timeout on a silent trusted peer:
    only for a listener whose accept loop serves nothing else. cheroot's
    reads the header without blocking (webdav/http.py, HeaderGate).

    cheroot takes the address accept() returns as REMOTE_ADDR, which the
    defender, wsgidav and the audit log all read; wrapping the listener sets it
    before cheroot (or TLS) sees the connection. Everything else is the
    wrapped socket's.
    """

    def __init__(self, sock: socket.socket, proxy: ProxyProtocol) -> None:
        self._sock = sock
        self._proxy = proxy

    def accept(self) -> tuple[socket.socket, Address]:
        conn, peer = self._sock.accept()
        client = self._proxy.client_address(conn, peer)
        if client is None:
            # cheroot's accept handling takes a timeout as "no connection this time".
            raise TimeoutError("connection refused by the PROXY protocol check")
        return conn, client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
