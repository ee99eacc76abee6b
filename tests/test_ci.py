"""The README's test command and .ci/run install the same Debian packages."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def packages(text: str) -> set[str]:
    match = re.search(r"apt-get install -y (?:-qq )?([^&>\n]+)", text)
    assert match, "no apt-get install line"
    return set(match.group(1).split())


def test_readme_and_ci_install_the_same_debian_packages():
    readme = packages((ROOT / "README.md").read_text())
    ci = packages((ROOT / ".ci" / "run").read_text())
    assert readme == ci
    assert {"postgresql", "haproxy"} <= ci
