"""The metrics wrappers around backends and uploads forward everything the contract defines.

`__getattr__` only forwards what the wrapper's classes do not define, and the
base classes define defaults (abort_stale_upload, backend_id, on_backend_id):
a wrapper that does not override one silently answers with the base default.
"""
from __future__ import annotations

from gateway.storage.base import Backend, Upload
from gateway.storage.instrumented import InstrumentedBackend, InstrumentedUpload


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_backend_wrapper_overrides_every_public_member_of_the_contract():
    missing = {name for name in public(Backend) if name not in vars(InstrumentedBackend)}
    assert not missing


def test_the_upload_wrapper_overrides_every_public_member_of_the_contract():
    missing = {name for name in public(Upload) if name not in vars(InstrumentedUpload)}
    assert not missing
