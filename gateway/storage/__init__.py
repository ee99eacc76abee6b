"""Storage backends and the registry that builds them from config.

Only UserFS and the server wiring use this package; front-ends never do.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Backend, Capabilities, Entry, Upload, Usage

# type name -> (module, backend class, config dataclass). Imported lazily so a
# deployment without boto3 can still run local backends.
BACKEND_TYPES: dict[str, tuple[str, str, str]] = {
    "local": ("gateway.storage.local", "LocalBackend", "LocalConfig"),
    "memory": ("gateway.storage.memory", "MemoryBackend", "MemoryConfig"),
    "s3": ("gateway.storage.s3", "S3Backend", "S3Config"),
}


def backend_classes(type_name: str) -> tuple[type[Backend], type]:
    """Return (backend class, config dataclass) for a type name.

    Raises:
        KeyError: the type is not known.
    """
    module_name, cls_name, config_name = BACKEND_TYPES[type_name]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, config_name)


def create_backend(type_name: str, config: Any) -> Backend:
    backend_cls, _ = backend_classes(type_name)
    return backend_cls(config)


__all__ = ["Backend", "Capabilities", "Entry", "Upload", "Usage", "BACKEND_TYPES",
           "backend_classes", "create_backend"]
