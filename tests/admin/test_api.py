"""The admin REST API over real HTTP: tokens, users, sessions and bans, driven as a provisioning tool would."""
from __future__ import annotations

import base64
import http.client
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from tests.admin.conftest import start_gateway
from tests.admin.helpers import NEW_PASSWORD, api_request, call
from tests.conftest import PASSWORD, RunningGateway, wait_for
from tests.sftp.helpers import sftp_client

REPO = Path(__file__).resolve().parents[2]
# The other end of the ban tests: a second loopback address, so the admin client stays unbanned.
ATTACKER = "127.0.0.2"


def webdav_status(running: RunningGateway, method: str, path: str, user: str, password: str,
                  body: bytes | None = None, source: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", running.webdav_port, timeout=60,
                                      source_address=(source, 0) if source else None)
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Basic {credentials}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def run_cli(running: RunningGateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(running.config_path)],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)


def api_routes(running: RunningGateway) -> list[tuple[str, str]]:
    router = running.gateway.frontends[-1].build_app()
    return [(t, m) for t, m in router.routes() if t.startswith("/api/v1/") and t != "/api/v1/openapi.json"]


def concrete(template: str) -> str:
    return template.removeprefix("/api/v1").replace("{name}", "alice").replace("{id}", "x") \
        .replace("{ip}", "10.0.0.1")


# -- tokens ---------------------------------------------------------------------

def test_every_api_route_answers_401_with_www_authenticate_without_a_token(api):
    routes = api_routes(api)
    assert len(routes) == 9
    for template, method in routes:
        answer = api_request(api.admin_port, method, concrete(template), body={})
        assert answer.status == 401, (method, template)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in answer.json()


def test_a_wrong_token_answers_401_and_a_right_one_200(api):
    assert call(api, "GET", "/users", token="not-a-token").status == 401
    assert call(api, "GET", "/users", token="").status == 401
    answer = call(api, "GET", "/users")
    assert answer.status == 200
    assert [u["name"] for u in answer.json()] == ["alice"]


def test_a_token_revoked_with_the_cli_answers_401(api):
    assert call(api, "GET", "/users").status == 200
    result = run_cli(api, "admin", "token", "revoke", "provisioning")
    assert result.returncode == 0, result.stderr
    answer = call(api, "GET", "/users")
    assert answer.status == 401
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]


def test_a_token_created_with_the_cli_is_accepted(api):
    result = run_cli(api, "admin", "token", "create", "ci")
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[-1]
    assert call(api, "GET", "/sessions", token=token).status == 200


def test_failed_token_checks_ban_the_address_then_the_ban_is_listed_and_lifted(api):
    limit = api.gateway.config.defender.max_failures
    for _ in range(limit):
        assert call(api, "GET", "/users", token="guess", source=ATTACKER).status == 401
    # Banned: refused before the token is looked at, even a right one, and on WebDAV too.
    answer = call(api, "GET", "/users", source=ATTACKER)
    assert answer.status == 403
    assert webdav_status(api, "GET", "/", "alice", PASSWORD, source=ATTACKER) == 403
    # The admin's own address is not banned.
    bans = call(api, "GET", "/bans")
    assert bans.status == 200
    [ban] = bans.json()
    assert ban["ip"] == ATTACKER
    assert ban["until"].endswith("Z") and "T" in ban["until"]
    assert call(api, "DELETE", f"/bans/{ATTACKER}").status == 204
    assert call(api, "GET", "/bans").json() == []
    assert call(api, "GET", "/users", source=ATTACKER).status == 200
    assert call(api, "DELETE", f"/bans/{ATTACKER}").status == 404


# -- users ----------------------------------------------------------------------

def test_created_user_logs_in_over_sftp_and_webdav(api, client_key):
    answer = call(api, "POST", "/users", {"name": "bob", "password": NEW_PASSWORD,
                                          "keys": [client_key.public_line],
                                          "permissions": {"/": ["*"], "/ro": ["list", "download"]},
                                          "quota_files": 100})
    assert answer.status == 201, answer.body
    assert answer.headers["Location"] == "/api/v1/users/bob"
    assert answer.json() == {"name": "bob", "keys": [client_key.public_line], "home": "local:/bob",
                             "permissions": {"/": ["*"], "/ro": ["download", "list"]}, "mounts": {},
                             "quota_bytes": 0, "quota_files": 100, "disabled": False}
    assert call(api, "GET", "/users/bob").json() == answer.json()
    with sftp_client(api.sftp_port, "bob", NEW_PASSWORD) as sftp:
        with sftp.open("/hello.txt", "wb") as fh:
            fh.write(b"over sftp")
    with sftp_client(api.sftp_port, "bob", pkey=client_key.pkey()) as sftp:
        assert sftp.listdir("/") == ["hello.txt"]
    assert webdav_status(api, "PUT", "/dav.txt", "bob", NEW_PASSWORD, b"over webdav") == 201
    assert webdav_status(api, "GET", "/hello.txt", "bob", NEW_PASSWORD) == 200
    assert (api.data / "bob" / "dav.txt").read_bytes() == b"over webdav"


def test_creating_a_user_that_exists_answers_409(api):
    answer = call(api, "POST", "/users", {"name": "alice", "password": NEW_PASSWORD})
    assert answer.status == 409
    assert answer.json()["error"] == "user 'alice' already exists"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"bob"', b"\xff\xfe"])
def test_malformed_json_answers_400(api, raw):
    answer = api_request(api.admin_port, "POST", "/users", token=api.token, raw=raw)
    assert answer.status == 400, answer.body
    assert answer.json()["error"]


@pytest.mark.parametrize("body, field", [
    ({"password": NEW_PASSWORD}, "name"),
    ({"name": 7, "password": NEW_PASSWORD}, "name"),
    ({"name": "bob", "password": 12345678}, "password"),
    ({"name": "bob", "password": NEW_PASSWORD, "home": 5}, "home"),
    ({"name": "bob", "password": NEW_PASSWORD, "keys": "ssh-ed25519 AAAA"}, "keys"),
    ({"name": "bob", "password": NEW_PASSWORD, "permissions": {"/": "list"}}, "permissions"),
    ({"name": "bob", "password": NEW_PASSWORD, "mounts": {"/m": "local:/m"}}, "mounts"),
    ({"name": "bob", "password": NEW_PASSWORD, "mounts": {"/m": {"permissions": ["*"]}}}, "mounts"),
    ({"name": "bob", "password": NEW_PASSWORD, "quota_bytes": "10"}, "quota_bytes"),
    ({"name": "bob", "password": NEW_PASSWORD, "quota_files": True}, "quota_files"),
    ({"name": "bob", "password": NEW_PASSWORD, "disabled": "yes"}, "disabled"),
    ({"name": "bob", "password": NEW_PASSWORD, "password_hash": "$argon2id$x"}, "password_hash"),
])
def test_wrong_types_and_unknown_fields_answer_400_naming_the_field(api, body, field):
    answer = call(api, "POST", "/users", body)
    assert answer.status == 400, answer.body
    assert answer.json()["field"] == field
    assert call(api, "GET", "/users/bob").status == 404


@pytest.mark.parametrize("body, field, message", [
    ({"name": "-bob", "password": NEW_PASSWORD}, "name",
     "name: invalid user name '-bob': use letters, digits, '.', '_', '-', '@'"),
    ({"name": "bob", "password": "short"}, "password", "password too short: use at least 8 characters"),
    ({"name": "bob"}, "password", "password: a user needs a password or at least one key"),
    ({"name": "bob", "password": NEW_PASSWORD, "home": "nohome"}, "home",
     "home: expected 'BACKEND:/path', got 'nohome'"),
    ({"name": "bob", "password": NEW_PASSWORD, "keys": ["ssh-ed25519 AAAAnotakey"]}, "keys",
     "keys[0]: invalid SSH public key: "),
    ({"name": "bob", "password": NEW_PASSWORD, "keys": ["nokey"]}, "keys",
     "keys[0]: not an OpenSSH public key line ('TYPE BASE64 [COMMENT]')"),
    ({"name": "bob", "password": NEW_PASSWORD, "mounts": {"/": {"target": "local:/x"}}}, "mounts",
     "mounts '/': a mount cannot replace the home at '/'"),
    ({"name": "bob", "password": NEW_PASSWORD, "mounts": {"/m": {"target": "nas:/x"}}}, "mounts",
     "mounts '/m': backend 'nas' is not defined"),
    ({"name": "bob", "password": NEW_PASSWORD, "quota_bytes": -1}, "quota_bytes",
     "quota_bytes: must be a whole number >= 0 (0 means no limit)"),
])
def test_invalid_values_answer_422_naming_the_field(api, body, field, message):
    answer = call(api, "POST", "/users", body)
    assert answer.status == 422, answer.body
    assert answer.json()["field"] == field
    assert answer.json()["error"].startswith(message)
    assert call(api, "GET", "/users/bob").status == 404


@pytest.mark.parametrize("option, field, value", [
    ("--home", "home", "nas:/bob"),
    ("--perm", "permissions", ("/docs", "read")),
])
def test_422_messages_are_the_clis(api, option, field, value):
    if field == "permissions":
        path, word = value
        cli_args, body_value, label = [option, f"{path}={word}"], {path: [word]}, f"{field} '{path}'"
        cli_label = f"{option} '{path}={word}'"
    else:
        cli_args, body_value, label, cli_label = [option, value], value, field, option
    result = run_cli(api, "user", "add", "bob", "--password-stdin", *cli_args, stdin=NEW_PASSWORD + "\n")
    assert result.returncode == 2
    cli_message = result.stderr.strip().removeprefix(f"gateway: {cli_label}: ")
    answer = call(api, "POST", "/users", {"name": "bob", "password": NEW_PASSWORD, field: body_value})
    assert answer.status == 422, answer.body
    assert answer.json()["error"] == f"{label}: {cli_message}"


def test_get_patch_delete_of_a_missing_user_answer_404(api):
    for method, body in (("GET", None), ("PATCH", {"disabled": True}), ("DELETE", None)):
        answer = call(api, method, "/users/nobody", body)
        assert answer.status == 404, method
        assert answer.json() == {"error": "no user 'nobody'"}


def test_patch_changes_only_the_fields_given(api, client_key):
    before = call(api, "GET", "/users/alice").json()
    answer = call(api, "PATCH", "/users/alice", {"quota_bytes": 4096, "mounts": {"/shared": {
        "target": "local:/shared", "permissions": ["list", "download"]}}})
    assert answer.status == 200, answer.body
    after = answer.json()
    assert after == {**before, "quota_bytes": 4096,
                     "mounts": {"/shared": {"target": "local:/shared", "permissions": ["download", "list"]}}}
    # The password is untouched: alice still logs in with it.
    with sftp_client(api.sftp_port, "alice", PASSWORD) as sftp:
        assert "shared" in sftp.listdir("/")


def test_patch_with_bad_input_changes_nothing(api):
    before = call(api, "GET", "/users/alice").json()
    assert call(api, "PATCH", "/users/alice", {"name": "eve"}).status == 400
    assert call(api, "PATCH", "/users/alice", {"quota_files": 3, "home": "nas:/x"}).status == 422
    assert call(api, "PATCH", "/users/alice", {"keys": [], "password": "short"}).status == 422
    assert call(api, "GET", "/users/alice").json() == before


def _connected_alice(api):
    transport = paramiko.Transport(("127.0.0.1", api.sftp_port))
    transport.connect(username="alice", password=PASSWORD)
    return transport, paramiko.SFTPClient.from_transport(transport)


@pytest.mark.parametrize("change", [{"password": NEW_PASSWORD}, {"disabled": True}, {"keys": []}, None])
def test_patch_of_credentials_or_delete_ends_the_users_sftp_session(api, change):
    transport, sftp = _connected_alice(api)
    try:
        sftp.listdir("/")
        if change is None:
            assert call(api, "DELETE", "/users/alice").status == 204
            assert call(api, "GET", "/users/alice").status == 404
        else:
            assert call(api, "PATCH", "/users/alice", change).status == 200
        wait_for(lambda: not transport.is_active(), "alice's SFTP connection to close")
    finally:
        sftp.close()
        transport.close()
    if change == {"password": NEW_PASSWORD}:
        with sftp_client(api.sftp_port, "alice", NEW_PASSWORD) as again:
            again.listdir("/")
        assert webdav_status(api, "GET", "/", "alice", PASSWORD) == 401


def test_patch_of_the_quota_keeps_the_session(api):
    transport, sftp = _connected_alice(api)
    try:
        assert call(api, "PATCH", "/users/alice", {"quota_files": 50}).status == 200
        sftp.listdir("/")
        assert transport.is_active()
    finally:
        sftp.close()
        transport.close()


# -- sessions -------------------------------------------------------------------

def test_a_session_is_listed_then_ended_through_the_api(api):
    transport, sftp = _connected_alice(api)
    try:
        sftp.listdir("/")
        sessions = []

        def listed() -> bool:
            sessions[:] = call(api, "GET", "/sessions").json()
            return any(s["user"] == "alice" for s in sessions)

        wait_for(listed, "alice's session in GET /sessions")
        [session] = sessions
        assert session["protocol"] == "sftp" and session["ip"] == "127.0.0.1"
        assert session["node"] == api.gateway.node
        assert session["started"].endswith("Z") and isinstance(session["bytes"], int)
        assert call(api, "DELETE", f"/sessions/{session['id']}").status == 204
        wait_for(lambda: not transport.is_active(), "the SFTP connection to close")
        assert call(api, "GET", "/sessions").json() == []
        assert call(api, "DELETE", f"/sessions/{session['id']}").status == 404
    finally:
        sftp.close()
        transport.close()


def test_ending_an_unknown_session_answers_404(api):
    answer = call(api, "DELETE", "/sessions/0123456789abcdef")
    assert answer.status == 404
    assert answer.json() == {"error": "no session '0123456789abcdef'"}


# -- across gateways sharing one store ----------------------------------------------

@pytest.fixture
def second_node(api, tmp_path, host_key_dir):
    """Another gateway (SFTP only) on the same store: it hears of changes only through the change feed."""
    store_file = api.gateway.config.server.state_dir / "gateway.db"
    (tmp_path / "node2").mkdir()
    running = start_gateway(tmp_path / "node2", host_key_dir,
                            extra={"store": {"url": f"sqlite:///{store_file}"},
                                   "webdav": {"enabled": False}, "admin": {"enabled": False}})
    yield running
    running.gateway.stop()


def test_patch_of_a_password_ends_the_session_on_another_gateway(api, second_node):
    transport = paramiko.Transport(("127.0.0.1", second_node.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        paramiko.SFTPClient.from_transport(transport).listdir("/")
        assert call(api, "PATCH", "/users/alice", {"password": NEW_PASSWORD}).status == 200
        wait_for(lambda: not transport.is_active(), "the other gateway to end alice's session")
    finally:
        transport.close()


def test_delete_of_a_session_ends_it_on_the_gateway_that_holds_it(api, second_node):
    transport = paramiko.Transport(("127.0.0.1", second_node.sftp_port))
    try:
        transport.connect(username="alice", password=PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
        sftp.listdir("/")
        found = []
        wait_for(lambda: found.extend(call(api, "GET", "/sessions").json()) or found, "the session listed")
        [session] = found
        assert call(api, "DELETE", f"/sessions/{session['id']}").status == 204
        wait_for(lambda: not transport.is_active(), "the other gateway to end the session")
    finally:
        transport.close()
