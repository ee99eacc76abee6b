"""The [sftp] config section and the front-end's import boundary."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from tests.conftest import write_config


def test_a_packet_size_below_what_sftp_clients_assume_is_a_config_error(tmp_path):
    path = write_config(tmp_path, extra={"sftp": {"max_packet_size": 1024}})
    with pytest.raises(ConfigError, match=r"\[sftp\] max_packet_size"):
        load_config(path)


def test_sftp_front_end_never_imports_storage():
    package = Path(__file__).resolve().parents[2] / "gateway" / "sftp"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "storage" not in (node.module or ""), f"{source.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any("storage" in a.name for a in node.names), source.name
