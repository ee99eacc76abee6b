"""The admin listener: health checks and Prometheus metrics over HTTP (cheroot, no framework)."""
from .server import AdminServer, create_server

__all__ = ["AdminServer", "create_server"]
