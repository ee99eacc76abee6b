"""HTTP connections as many clients use them: kept alive, not a TCP (or TLS) handshake per request."""
from __future__ import annotations

import http.client
import threading

CLIENTS = 20
ROUNDS = 5


def test_twenty_concurrent_keep_alive_clients_all_keep_their_connection(dav, alice):
    assert alice.put("/f.txt", b"hello").status == 201   # also caches the credential check
    barrier = threading.Barrier(CLIENTS)
    problems: list[str] = []

    def client(number: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", dav.webdav_port, timeout=60)
        try:
            conn.connect()
            sock = conn.sock
            for round_ in range(ROUNDS):
                conn.request("GET", "/f.txt", headers={"Authorization": alice.auth})
                reply = conn.getresponse()
                body = reply.read()
                if reply.status != 200 or body != b"hello":
                    problems.append(f"client {number} round {round_}: {reply.status}")
                if (reply.getheader("Connection") or "").lower() == "close" or conn.sock is not sock:
                    problems.append(f"client {number} round {round_}: connection closed")
                # Everyone idle at once: the server holds all twenty connections open.
                barrier.wait(timeout=120)
        except Exception as exc:
            problems.append(f"client {number}: {exc!r}")
            barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
