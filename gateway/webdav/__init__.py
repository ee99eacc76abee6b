"""WebDAV front-end: wsgidav on cheroot over each user's UserFS."""
from .server import WebDAVServer, create_server

__all__ = ["WebDAVServer", "create_server"]
