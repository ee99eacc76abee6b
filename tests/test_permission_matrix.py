"""The permission matrix through UserFS itself; the protocol suites run the same table."""
from __future__ import annotations

import pytest

from gateway.errors import PermissionDenied
from tests import permission_matrix as pm


@pytest.fixture(scope="module")
def matrix_env(tmp_path_factory):
    from gateway.config import load_config
    from gateway.server import Gateway
    from tests.conftest import write_config
    tmp = tmp_path_factory.mktemp("matrix")
    gateway = Gateway(load_config(write_config(tmp, webdav=False, sftp=False)))
    from tests.conftest import RunningGateway
    running = RunningGateway(gateway, tmp / "gateway.toml", tmp / "data")
    running.add_user(pm.USER, perms=pm.PERMS)
    yield running
    gateway.stop()


def run_op(fs, s: pm.Scenario) -> None:
    if s.op == "list":
        list(fs.list_dir(s.path))
    elif s.op == "download":
        with fs.open_read(s.path) as f:
            assert f.read() == pm.CONTENT
    elif s.op in ("upload", "overwrite"):
        with fs.open_write(s.path) as up:
            up.write(pm.NEW_CONTENT)
    elif s.op == "delete":
        fs.remove_file(s.path)
    elif s.op == "mkdir":
        fs.make_dir(s.path)
    elif s.op == "rmdir":
        fs.remove_dir(s.path)
    elif s.op == "rename":
        fs.rename(s.path, s.dest)
    elif s.op == "set_times":
        fs.set_mtime(s.path, pm.MTIME)


@pytest.mark.parametrize("scenario", pm.SCENARIOS, ids=lambda s: s.id)
def test_permission_matrix_through_userfs(matrix_env, scenario):
    home = matrix_env.data / pm.USER
    pm.seed(home)
    fs = matrix_env.fs(pm.USER)
    if scenario.allowed:
        run_op(fs, scenario)
        assert pm.effect_visible(home, scenario)
    else:
        with pytest.raises(PermissionDenied):
            run_op(fs, scenario)
        assert pm.unchanged(home, scenario)
