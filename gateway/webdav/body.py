"""Request bodies of known length on plain HTTP, read straight from the socket.

cheroot reads a body through `_pyio.BufferedReader` (the pure-Python one) and
`KnownLengthRFile`: every block is read in pieces, joined into a new bytes
object and copied again on the way to the file. Profiled on a 512 MiB PUT,
that reader was about half of the server's time. Here a PUT body goes from the
socket with `recv_into` into one reusable buffer, which the upload writes as
it is: one copy in, one copy out, and no Python per socket read beyond a
loop step.

Only a body with a Content-Length takes this path, on plain TCP or TLS (an
`ssl.SSLSocket` hands out one decrypted record, up to 16 KiB, per
`recv_into`). Chunked bodies keep cheroot's reader (`direct_socket` returns
None for them). The socket keeps its timeout, so a stalled client
still ends the request with `socket.timeout`, as it does in cheroot's reader.
"""
from __future__ import annotations

import socket
import ssl

from cheroot import server as cheroot_server
from cheroot.makefile import StreamReader


def direct_socket(req: cheroot_server.HTTPRequest) -> socket.socket | None:
    """The socket (TCP or TLS) `req`'s body can be read from directly, or None for cheroot's reader."""
    if req.chunked_read or type(req.rfile) is not cheroot_server.KnownLengthRFile:
        return None
    conn = req.conn
    # Exactly these classes: a wrapper of another kind may buffer bytes of its own.
    if type(conn.socket) not in (socket.socket, ssl.SSLSocket) or not isinstance(conn.rfile, StreamReader):
        return None
    return conn.socket


def read_body_into(req: cheroot_server.HTTPRequest, sock: socket.socket, buffer: memoryview) -> int:
    """Fill `buffer` with the next body bytes of `req`; fewer only at the end of the body.

    Returns 0 once the Content-Length is read, or when the client closed the
    connection early (the caller compares the total with the length). Bytes
    cheroot buffered along with the headers come first; `remaining` and
    `bytes_read` are kept as cheroot's own reader keeps them.
    """
    body = req.rfile
    stream = req.conn.rfile
    want = min(len(buffer), body.remaining)
    got = 0
    # The buffer attributes of _pyio.BufferedReader, which cheroot's own
    # has_data() reads too (http.py's HeaderGate fills them).
    pending = len(stream._read_buf) - stream._read_pos
    if pending > 0 and want > 0:
        got = min(pending, want)
        start = stream._read_pos
        buffer[:got] = stream._read_buf[start:start + got]
        stream._read_pos = start + got
    while got < want:
        # Not MSG_WAITALL: with it the kernel would wait past the socket's timeout.
        count = sock.recv_into(buffer[got:want])
        if count == 0:
            break
        got += count
    body.remaining -= got
    stream.bytes_read += got
    return got
