"""Protocol-neutral error tree.

Backends translate their native errors into these classes in one table each;
front-ends map these classes to status codes in one table each.
"""
from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    template = "error on '{path}'"

    def __init__(self, path: str = "", message: str | None = None) -> None:
        self.path = path
        self.message = message or self.template.format(path=path)
        super().__init__(self.message)


class NotFound(GatewayError):
    template = "'{path}' not found"


class AlreadyExists(GatewayError):
    template = "'{path}' already exists"


class NotADirectory(GatewayError):
    template = "'{path}' is not a directory"


class IsADirectory(GatewayError):
    template = "'{path}' is a directory"


class DirectoryNotEmpty(GatewayError):
    template = "directory '{path}' is not empty"


class PermissionDenied(GatewayError):
    template = "permission denied on '{path}'"


class InvalidPath(GatewayError):
    template = "invalid path '{path}'"


class Unsupported(GatewayError):
    template = "operation not supported on '{path}'"


class QuotaExceeded(GatewayError):
    template = "quota exceeded writing '{path}'"


class StorageFull(QuotaExceeded):
    """The storage itself is out of space (a full disk): not the user's quota."""

    template = "no space left on the storage writing '{path}'"


class BackendUnavailable(GatewayError):
    template = "storage unavailable for '{path}'"
