"""Who reaches the REST API: [admin] allow_networks and api = false, while health checks and metrics answer anyone."""
from __future__ import annotations

import http.client
import tomllib

import pytest
import tomli_w

from gateway.config import ConfigError, load_config
from tests.admin.conftest import start_gateway
from tests.admin.helpers import api_request
from tests.conftest import write_config

OUTSIDER = "127.0.0.2"


def status_from(source: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def only_local_host(tmp_path, host_key_dir):
    running = start_gateway(tmp_path, host_key_dir, extra={"admin": {"allow_networks": ["127.0.0.1/32"]},
                                                           "defender": {"max_failures": 3}})
    running.token = running.gateway.store.create_token("provisioning")
    yield running
    running.gateway.stop()


def test_an_address_outside_allow_networks_gets_403_even_with_a_valid_token(only_local_host):
    port, token = only_local_host.admin_port, only_local_host.token
    for path in ("/users", "/sessions", "/bans", "/openapi.json"):
        answer = api_request(port, "GET", path, token=token, source=OUTSIDER)
        assert answer.status == 403, (path, answer.body)
        assert answer.json() == {"error": "the admin API does not answer this address ([admin] allow_networks)"}
    assert api_request(port, "GET", "/users", token=token).status == 200


def test_health_checks_and_metrics_answer_outside_allow_networks(only_local_host):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert status_from(OUTSIDER, only_local_host.admin_port, path) == 200, path


def test_refusals_outside_allow_networks_look_at_no_token_and_ban_nobody(only_local_host):
    for _ in range(5):
        assert api_request(only_local_host.admin_port, "GET", "/users", token="guess",
                           source=OUTSIDER).status == 403
    assert not only_local_host.gateway.defender.is_banned(OUTSIDER)


def test_api_false_leaves_the_rest_api_out_and_health_checks_in(tmp_path, host_key_dir):
    running = start_gateway(tmp_path, host_key_dir, extra={"admin": {"api": False}})
    try:
        token = running.gateway.store.create_token("provisioning")
        for path in ("/users", "/openapi.json"):
            assert api_request(running.admin_port, "GET", path, token=token).status == 404, path
        for path in ("/healthz", "/readyz", "/metrics"):
            assert status_from("127.0.0.1", running.admin_port, path) == 200, path
    finally:
        running.gateway.stop()


def test_by_default_the_api_answers_loopback_addresses_only(tmp_path):
    admin = load_config(write_config(tmp_path, admin=True)).admin
    assert admin.api is True
    assert admin.allow_networks == ["127.0.0.0/8", "::1"]


def test_a_malformed_allow_networks_entry_names_the_key(tmp_path):
    path = write_config(tmp_path, admin=True, extra={"admin": {"allow_networks": ["127.0.0.1", "10.0.0.1/8"]}})
    with pytest.raises(ConfigError, match=r"\[admin\] allow_networks\[1\]: '10.0.0.1/8'"):
        load_config(path)


def test_a_reload_applies_new_allow_networks_to_the_running_api(only_local_host, tmp_path):
    port, token = only_local_host.admin_port, only_local_host.token
    assert api_request(port, "GET", "/users", token=token, source=OUTSIDER).status == 403
    settings = tomllib.loads(only_local_host.config_path.read_text())
    settings["admin"]["allow_networks"] = ["127.0.0.1", "127.0.0.2"]
    only_local_host.config_path.write_text(tomli_w.dumps(settings))
    only_local_host.gateway.reload(load_config(only_local_host.config_path))
    assert api_request(port, "GET", "/users", token=token, source=OUTSIDER).status == 200
    assert api_request(port, "GET", "/users", token=token, source="127.0.0.3").status == 403
