"""Hostile input to the admin API: answered 400/422 on both store dialects, never 500, and never a forged log line."""
from __future__ import annotations

import json
import logging

import pytest

from tests.admin.helpers import NEW_PASSWORD, api_request, call

LARGEST_QUOTA = (1 << 63) - 1
# A line that, written raw after a newline, would pass for one of the gateway's own.
FORGED = "2026-12-08 02:00:00,000 INFO gateway.audit: FORGED login of admin ok"


def nested(depth: int) -> bytes:
    return b'{"name": "bob", "password": "long enough!", "keys": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("method, path", [("POST", "/users"), ("PATCH", "/users/alice")])
def test_deeply_nested_json_answers_400_and_changes_nothing(api_on_each_store, method, path):
    before = call(api_on_each_store, "GET", "/users").json()
    answer = api_request(api_on_each_store.admin_port, method, path, token=api_on_each_store.token,
                         raw=nested(100_000))
    assert answer.status == 400, answer.body
    assert answer.json()["error"] == "the body is not valid JSON: nested too deeply"
    assert call(api_on_each_store, "GET", "/users").json() == before


@pytest.mark.parametrize("key", ["quota_bytes", "quota_files"])
@pytest.mark.parametrize("value", [1 << 63, 1 << 64, 10 ** 40])
def test_a_quota_past_64_bits_answers_422_on_create_and_on_change(api_on_each_store, key, value):
    created = call(api_on_each_store, "POST", "/users", {"name": "bob", "password": NEW_PASSWORD, key: value})
    assert created.status == 422, created.body
    assert created.json() == {"field": key, "error": f"{key}: must be a whole number >= 0 "
                                                     f"(0 means no limit) and at most {LARGEST_QUOTA}"}
    assert call(api_on_each_store, "GET", "/users/bob").status == 404
    changed = call(api_on_each_store, "PATCH", "/users/alice", {key: value})
    assert changed.status == 422, changed.body
    assert call(api_on_each_store, "GET", "/users/alice").json()[key] == 0


def test_the_largest_64_bit_quota_is_stored_and_read_back(api_on_each_store):
    answer = call(api_on_each_store, "POST", "/users", {"name": "bob", "password": NEW_PASSWORD,
                                                        "quota_bytes": LARGEST_QUOTA})
    assert answer.status == 201, answer.body
    assert call(api_on_each_store, "GET", "/users/bob").json()["quota_bytes"] == LARGEST_QUOTA


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/users", b'{"name": "bob", "password": "long enough \\ud800"}'),
    ("PATCH", "/users/alice", b'{"password": "\\udfff long enough"}'),
])
def test_a_password_with_a_lone_surrogate_gets_a_clear_422(api, method, path, body):
    answer = api_request(api.admin_port, method, path, token=api.token, raw=body)
    assert answer.status == 422, answer.body
    assert answer.json() == {"field": "password", "error": "password is not valid Unicode text "
                                                           "(it holds a lone surrogate or bytes that are not UTF-8)"}
    assert "codec" not in answer.json()["error"]


@pytest.mark.parametrize("name, reason", [
    ("ａｌｉｃｅ", "not in Unicode normal form NFKC (write it as 'alice')"),
    ("\u0430lice", "it mixes Latin, Greek or Cyrillic letters"),     # a Cyrillic "а"
    ("bob\u00b2", "use letters, digits 0-9, '.', '_', '-', '@'"),   # a superscript two
])
def test_a_name_that_looks_like_another_answers_422(api, name, reason):
    answer = call(api, "POST", "/users", {"name": name, "password": NEW_PASSWORD})
    assert answer.status == 422, answer.body
    assert answer.json() == {"field": "name", "error": f"name: invalid user name {name!r}: {reason}"}
    assert [u["name"] for u in call(api, "GET", "/users").json()] == ["alice"]


def test_a_name_differing_from_a_user_only_in_case_answers_409(api):
    answer = call(api, "POST", "/users", {"name": "Alice", "password": NEW_PASSWORD})
    assert answer.status == 409, answer.body
    assert answer.json()["error"] == ("user name 'Alice' is taken: "
                                      "user 'alice' differs from it only in case or Unicode form")
    assert [u["name"] for u in call(api, "GET", "/users").json()] == ["alice"]


def test_names_in_other_scripts_are_still_welcome(api):
    for name in ("jürgen", "山田", "Ἀθηνᾶ", "иванова", "ola.nordmann@example.org"):
        answer = call(api, "POST", "/users", {"name": name, "password": NEW_PASSWORD})
        assert answer.status == 201, (name, answer.body)


def test_a_newline_in_the_path_of_a_failing_request_does_not_forge_a_log_line(api, monkeypatch, caplog):
    def broken(name):
        raise RuntimeError("store fault")

    monkeypatch.setattr(api.gateway.store, "get_user", broken)
    with caplog.at_level(logging.ERROR):
        answer = call(api, "GET", "/users/bob%0a" + FORGED.replace(" ", "%20"))
    assert answer.status == 500
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR and "admin request" in r.getMessage()]
    assert "\n" not in record.getMessage()
    assert r"/users/bob\n2026-12-08" in record.getMessage()
    assert not [line for line in caplog.text.splitlines() if line.startswith("2026-12-08")]


def test_a_failed_token_check_is_an_audit_line(api, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        assert call(api, "GET", "/users", token="guessed-token", source="127.0.0.2").status == 401
        assert call(api, "GET", "/users").status == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [(line["op"], line["protocol"], line["method"], line["result"], line["ip"]) for line in lines] \
        == [("login", "admin", "token", "failed", "127.0.0.2")]
    assert "guessed-token" not in caplog.text
