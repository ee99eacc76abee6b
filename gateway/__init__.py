"""gateway: a WebDAV + SFTP file gateway over pluggable storage."""

__version__ = "0.1.0"
