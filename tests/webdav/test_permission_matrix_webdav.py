"""The shared permission matrix through WebDAV: the same answers as UserFS, denied = 403."""
from __future__ import annotations

import email.utils

import pytest

from tests import permission_matrix as pm
from tests.webdav.conftest import DavClient

WIN32_MTIME = (b'<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" '
               b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop><Z:Win32LastModifiedTime>'
               + email.utils.formatdate(pm.MTIME, usegmt=True).encode()
               + b'</Z:Win32LastModifiedTime></D:prop></D:set></D:propertyupdate>')


@pytest.fixture(scope="module")
def matrix_dav(tmp_path_factory):
    from gateway.config import load_config
    from gateway.server import Gateway
    from tests.conftest import RunningGateway, write_config
    tmp = tmp_path_factory.mktemp("matrix-dav")
    gateway = Gateway(load_config(write_config(tmp, webdav=True, sftp=False)))
    running = RunningGateway(gateway, tmp / "gateway.toml", tmp / "data")
    running.add_user(pm.USER, perms=pm.PERMS)
    gateway.start()
    yield running, DavClient(gateway.frontends[0].address[1], pm.USER)
    gateway.stop()


def run_op(client: DavClient, s: pm.Scenario) -> int:
    """Perform the scenario over WebDAV; return the HTTP status that decides it."""
    if s.op == "list":
        return client.propfind(s.path, "1").status
    if s.op == "download":
        reply = client.get(s.path)
        assert reply.status != 200 or reply.body == pm.CONTENT
        return reply.status
    if s.op in ("upload", "overwrite"):
        return client.put(s.path, pm.NEW_CONTENT).status
    if s.op in ("delete", "rmdir"):
        return client.request("DELETE", s.path).status
    if s.op == "mkdir":
        return client.request("MKCOL", s.path).status
    if s.op == "rename":
        return client.request("MOVE", s.path, headers={"Destination": s.dest, "Overwrite": "F"}).status
    if s.op == "set_times":
        reply = client.proppatch(s.path, WIN32_MTIME)
        assert reply.status == 207
        return 403 if b"403 Forbidden" in reply.body else 200
    raise ValueError(s.op)


@pytest.mark.parametrize("scenario", pm.SCENARIOS, ids=lambda s: s.id)
def test_permission_matrix_through_webdav(matrix_dav, scenario):
    running, client = matrix_dav
    home = running.data / pm.USER
    pm.seed(home)
    status = run_op(client, scenario)
    if scenario.allowed:
        assert 200 <= status < 300, status
        assert pm.effect_visible(home, scenario)
    else:
        assert status == 403
        assert pm.unchanged(home, scenario)
