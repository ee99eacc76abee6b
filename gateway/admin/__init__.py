"""The admin listener: health checks, Prometheus metrics and the REST API over HTTP (cheroot, no framework)."""
from .server import AdminServer, create_server

__all__ = ["AdminServer", "create_server"]
