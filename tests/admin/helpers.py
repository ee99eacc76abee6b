"""Admin listener test helpers: plain HTTP(S) requests and a parsed /metrics scrape."""
from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def admin_request(port: int, method: str, path: str, *, context: ssl.SSLContext | None = None,
                  host: str = "127.0.0.1", timeout: float = 60) -> Answer:
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


class Scrape:
    """One /metrics answer: sample values by name and labels (missing samples read as 0)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


def scrape(port: int) -> Scrape:
    answer = admin_request(port, "GET", "/metrics")
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"].startswith("text/plain")
    return Scrape(answer.body.decode())


NEW_PASSWORD = "another long secret"

# Every admin API answer of the test run, so a test can check that none carries a hash.
API_ANSWERS: list[Answer] = []


def api_request(port: int, method: str, path: str, *, token: str | None = None, body=None,
                raw: bytes | None = None, source: str | None = None) -> Answer:
    """One request to /api/v1 (`path` below it) with a bearer token and a JSON (or raw) body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                      source_address=(source, 0) if source else None)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, f"/api/v1{path}", body=payload, headers=headers)
        resp = conn.getresponse()
        answer = Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
    API_ANSWERS.append(answer)
    return answer


def call(running, method: str, path: str, body=None, **kwargs) -> Answer:
    """api_request to `running`'s admin listener with its token (`running.token`) unless given."""
    kwargs.setdefault("token", running.token)
    return api_request(running.admin_port, method, path, body=body, **kwargs)
