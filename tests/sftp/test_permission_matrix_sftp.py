"""The permission matrix of tests/permission_matrix.py through SFTP: same answers as UserFS."""
from __future__ import annotations

import pytest

from tests import permission_matrix as pm
from tests.sftp.helpers import sftp_client, start_sftp_gateway


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory, host_key_dir):
    server = start_sftp_gateway(tmp_path_factory.mktemp("sftp-matrix"), host_key_dir)
    server.add_user(pm.USER, perms=pm.PERMS)
    yield server
    server.gateway.stop()


def run_op(client, s: pm.Scenario) -> None:
    if s.op == "list":
        client.listdir(s.path)
    elif s.op == "download":
        with client.open(s.path) as f:
            assert f.read() == pm.CONTENT
    elif s.op in ("upload", "overwrite"):
        with client.open(s.path, "w") as f:
            f.write(pm.NEW_CONTENT)
    elif s.op == "delete":
        client.remove(s.path)
    elif s.op == "mkdir":
        client.mkdir(s.path)
    elif s.op == "rmdir":
        client.rmdir(s.path)
    elif s.op == "rename":
        client.rename(s.path, s.dest)
    elif s.op == "set_times":
        client.utime(s.path, (pm.MTIME, pm.MTIME))


@pytest.mark.parametrize("scenario", pm.SCENARIOS, ids=lambda s: s.id)
def test_permission_matrix_through_sftp(matrix_server, scenario):
    home = matrix_server.data / pm.USER
    pm.seed(home)
    with sftp_client(matrix_server.sftp_port, pm.USER) as client:
        if scenario.allowed:
            run_op(client, scenario)
            assert pm.effect_visible(home, scenario)
        else:
            with pytest.raises(PermissionError):
                run_op(client, scenario)
            assert pm.unchanged(home, scenario)
