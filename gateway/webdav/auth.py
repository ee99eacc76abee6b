"""HTTP Basic authentication for wsgidav against the gateway's users file.

Digest is impossible with argon2 hashes, so only Basic is offered (TLS is the
operator's job; the server warns when it is missing). Failed logins feed the
shared defender through `Authenticator.check_password`, keyed by client IP.
"""
from __future__ import annotations

from wsgidav.dav_error import HTTP_SERVICE_UNAVAILABLE, DAVError
from wsgidav.dc.base_dc import BaseDomainController

from ..errors import BackendUnavailable

REALM = "gateway"


class GatewayDomainController(BaseDomainController):
    """wsgidav domain controller: one realm, users from the gateway's Authenticator.

    wsgidav builds it from a class with (app, config); the server puts the
    Authenticator in `config["gateway"]["auth"]`.
    """

    def __init__(self, wsgidav_app, config: dict) -> None:
        super().__init__(wsgidav_app, config)
        self._auth = config["gateway"]["auth"]

    def __str__(self) -> str:
        return "GatewayDomainController"

    def get_domain_realm(self, path_info: str, environ: dict) -> str:
        return REALM

    def require_authentication(self, realm: str, environ: dict) -> bool:
        # Windows' mini-redirector probes with an anonymous OPTIONS and gives
        # up on a 401; the answer reveals nothing but the server's methods.
        if environ is not None and environ.get("REQUEST_METHOD") == "OPTIONS" \
                and "HTTP_AUTHORIZATION" not in environ:
            return False
        return True

    def basic_auth_user(self, realm: str, user_name: str, password: str, environ: dict) -> bool:
        try:
            user = self._auth.check_password(user_name, password, environ.get("REMOTE_ADDR", ""),
                                             protocol="webdav", method="basic", count_cached=False)
        except BackendUnavailable as exc:
            # 503, not 401: a 401 makes Explorer and Finder ask for a password that is not wrong.
            raise DAVError(HTTP_SERVICE_UNAVAILABLE, context_info=exc.message) from None
        if user is None:
            return False
        environ["gateway.user"] = user
        return True

    def supports_http_digest_auth(self) -> bool:
        return False
