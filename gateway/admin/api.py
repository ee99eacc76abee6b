"""The admin REST API under /api/v1: users, sessions and bans, behind bearer tokens.

Users are checked field by field with the CLI's own functions (gateway/users.py),
so both say the same thing about the same mistake. Only addresses in
`[admin] allow_networks` get an answer. Tokens are checked against their
hashes in the store; a failed check is an audit line (op "login", protocol
"admin", method "token") and counts as a failed login of the client address
in the defender, and a banned address is refused before any token is looked
at. No answer carries a password hash or a token hash.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .. import audit
from ..permissions import format_perms
from ..proxy_protocol import in_networks, parse_networks
from ..store import StoreUnavailable
from ..users import (NoSuchUser, User, UserExists, UsersFileError, check_new_name, check_password,
                     check_quota, hash_password, parse_home, parse_mount, parse_perm_rule,
                     parse_public_key)
from . import openapi
from .router import Handler, Request, Response, Router, json_response

if TYPE_CHECKING:
    from ..server import Gateway

log = logging.getLogger(__name__)

PREFIX = openapi.PREFIX
# A user is a few KiB even with many keys and rules: refuse larger bodies unread.
MAX_BODY_BYTES = 1 << 20
_REALM = 'Bearer realm="gateway-admin"'


class ApiError(Exception):
    """Answer `status` with {"error": message[, "field": field]}."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or []

    def response(self) -> Response:
        body: dict[str, Any] = {"error": str(self)}
        if self.field is not None:
            body["field"] = self.field
        return json_response(self.status, body, self.headers)


def _rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def user_json(user: User) -> dict:
    """A user as the API shows it: every field but the password hash."""
    return {
        "name": user.name,
        "keys": list(user.keys),
        "home": str(user.home),
        "permissions": {path: format_perms(perms) for path, perms in user.permissions.items()},
        "mounts": {m.path: {"target": str(m.target), "permissions": format_perms(m.permissions)}
                   for m in user.mounts},
        "quota_bytes": user.quota_bytes,
        "quota_files": user.quota_files,
        "disabled": user.disabled,
    }


# -- request bodies: types first (400), then values (422) ---------------------

def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_mount(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("target"), str)
            and set(value) <= {"target", "permissions"}
            and ("permissions" not in value or _is_strings(value["permissions"])))


# The schema's types, in code (openapi.SCHEMAS says the same; a test holds them together).
_TYPES = {
    "name": ("a string", lambda v: isinstance(v, str)),
    "password": ("a string", lambda v: isinstance(v, str)),
    "keys": ("a list of strings", _is_strings),
    "home": ("a string 'backend:/path'", lambda v: isinstance(v, str)),
    "permissions": ("an object of '/path': [\"perm\", ...]",
                    lambda v: isinstance(v, dict) and all(_is_strings(w) for w in v.values())),
    "mounts": ("an object of '/path': {\"target\": \"backend:/path\", \"permissions\": [...]}",
               lambda v: isinstance(v, dict) and all(_is_mount(m) for m in v.values())),
    "quota_bytes": ("an integer", _is_int),
    "quota_files": ("an integer", _is_int),
    "disabled": ("true or false", lambda v: isinstance(v, bool)),
}


def _read_json(request: Request) -> dict:
    environ = request.environ
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "invalid Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    raw = environ["wsgi.input"].read(length) if length > 0 else b""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        # json's C decoder counts its depth against the interpreter's recursion limit.
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _check_types(body: dict, fields: set[str], required: tuple[str, ...] = ()) -> None:
    for key in required:
        if key not in body:
            raise ApiError(400, f"{key}: required", key)
    for key, value in body.items():
        if key not in fields:
            raise ApiError(400, f"{key}: unknown field", key)
        what, ok = _TYPES[key]
        if not ok(value):
            raise ApiError(400, f"{key}: must be {what}", key)


class UserFields:
    """Turns JSON fields into User fields with the CLI's checks; a bad value is a 422 naming it."""

    def __init__(self, backends: set[str], config_name: str) -> None:
        self.backends = backends
        self.config_name = config_name

    def changes(self, body: dict) -> dict[str, Any]:
        """User dataclass field -> new value, for each JSON field in `body` but the name."""
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key == "name":
                continue
            try:
                changes.update(self._convert(key, value))
            except ValueError as exc:
                raise ApiError(422, str(exc), key) from None
        return changes

    def _convert(self, key: str, value: Any) -> dict[str, Any]:
        """Raises ValueError with the message as answered: the field's name, then the CLI's words."""
        if key == "password":
            # check_password's message names the password already.
            return {"password_hash": hash_password(check_password(value))}
        if key == "keys":
            keys = []
            for i, line in enumerate(value):
                try:
                    keys.append(parse_public_key(line))
                except ValueError as exc:
                    raise ValueError(f"keys[{i}]: {exc}") from None
            return {"keys": tuple(keys)}
        if key == "home":
            try:
                return {"home": parse_home(value, self.backends, self.config_name)}
            except ValueError as exc:
                raise ValueError(f"home: {exc}") from None
        if key == "permissions":
            rules = {}
            for path, words in value.items():
                try:
                    normalized, perms = parse_perm_rule(path, words)
                except ValueError as exc:
                    raise ValueError(f"permissions '{path}': {exc}") from None
                rules[normalized] = perms
            return {"permissions": rules}
        if key == "mounts":
            mounts = []
            for path, mount in value.items():
                try:
                    mounts.append(parse_mount(path, mount["target"], mount.get("permissions", ["*"]),
                                              self.backends))
                except ValueError as exc:
                    raise ValueError(f"mounts '{path}': {exc}") from None
            return {"mounts": tuple(mounts)}
        if key in ("quota_bytes", "quota_files"):
            return {key: check_quota(key, value)}
        return {key: value}   # disabled: its type is all there is to check


def _needs_a_credential(user: User) -> None:
    if not user.password_hash and not user.keys:
        raise ApiError(422, "password: a user needs a password or at least one key", "password")


class AdminApi:
    """The /api/v1 handlers of one gateway process."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.fields = UserFields(set(gateway.backends), str(gateway.config.path))
        self.networks = parse_networks(gateway.config.admin.allow_networks)

    def install(self, router: Router) -> None:
        guarded = self.guarded
        router.add(f"{PREFIX}/openapi.json", "GET", self.allowed(self.openapi))
        router.add(f"{PREFIX}/users", "GET", guarded(self.list_users))
        router.add(f"{PREFIX}/users", "POST", guarded(self.create_user))
        router.add(f"{PREFIX}/users/{{name}}", "GET", guarded(self.get_user))
        router.add(f"{PREFIX}/users/{{name}}", "PATCH", guarded(self.update_user))
        router.add(f"{PREFIX}/users/{{name}}", "DELETE", guarded(self.delete_user))
        router.add(f"{PREFIX}/sessions", "GET", guarded(self.list_sessions))
        router.add(f"{PREFIX}/sessions/{{id}}", "DELETE", guarded(self.end_session))
        router.add(f"{PREFIX}/bans", "GET", guarded(self.list_bans))
        router.add(f"{PREFIX}/bans/{{ip}}", "DELETE", guarded(self.lift_ban))

    # -- authentication ---------------------------------------------------------

    def allowed(self, handler: Handler) -> Handler:
        """`handler` for addresses in [admin] allow_networks; 403 for the others."""
        def run(request: Request) -> Response:
            # Security decision: checked first, so other addresses learn nothing of bans or tokens.
            if not in_networks(request.environ.get("REMOTE_ADDR", ""), self.networks):
                return json_response(403, {"error": "the admin API does not answer this address "
                                                    "([admin] allow_networks)"})
            return handler(request)
        return run

    def guarded(self, handler: Handler) -> Handler:
        """`handler` behind allow_networks, the ban check and a bearer token; ApiError and store
        outages become JSON."""
        @self.allowed
        def run(request: Request) -> Response:
            try:
                self._authenticate(request)
                return handler(request)
            except ApiError as exc:
                return exc.response()
            except StoreUnavailable as exc:
                log.warning("admin API: %s", exc)
                return json_response(503, {"error": "the state store cannot be reached"})
        return run

    def _authenticate(self, request: Request) -> str:
        ip = request.environ.get("REMOTE_ADDR", "")
        defender = self.gateway.defender
        # Security decision: a banned address learns nothing about tokens, right or wrong.
        if defender.is_banned(ip):
            raise ApiError(403, "this address is banned after too many failed logins")
        scheme, _, token = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "a bearer token is required (gateway admin token create NAME)",
                           headers=[("WWW-Authenticate", _REALM)])
        name = self.gateway.store.verify_token(token)
        if name is None:
            audit.record_login(user="", protocol="admin", ip=ip, method="token", ok=False)
            defender.record_failure(ip, None)
            raise ApiError(401, "invalid or revoked token",
                           headers=[("WWW-Authenticate", f'{_REALM}, error="invalid_token"')])
        return name

    # -- handlers ---------------------------------------------------------------

    def openapi(self, request: Request) -> Response:
        return json_response(200, openapi.document())

    def list_users(self, request: Request) -> Response:
        return json_response(200, [user_json(u) for u in self.gateway.store.list_users()])

    def _user(self, name: str) -> User:
        user = self.gateway.store.get_user(name)
        if user is None:
            raise ApiError(404, f"no user '{name}'")
        return user

    def get_user(self, request: Request) -> Response:
        return json_response(200, user_json(self._user(request.params["name"])))

    def create_user(self, request: Request) -> Response:
        body = _read_json(request)
        _check_types(body, set(_TYPES), required=("name",))
        name = body["name"]
        try:
            check_new_name(name)
        except UsersFileError as exc:
            raise ApiError(422, f"name: {exc}", "name") from None
        default_home = f"{next(iter(self.gateway.backends))}:/{name}"
        fields = self.fields.changes({"home": default_home, **body})
        user = User(name, **fields)
        _needs_a_credential(user)
        try:
            self.gateway.users.add(user)
        except UserExists as exc:
            raise ApiError(409, str(exc)) from None
        except UsersFileError as exc:
            raise ApiError(422, str(exc)) from None
        location = f"{PREFIX}/users/{quote(name, safe='@')}"
        return json_response(201, user_json(self._user(name)), [("Location", location)])

    def update_user(self, request: Request) -> Response:
        name = request.params["name"]
        body = _read_json(request)
        _check_types(body, set(_TYPES) - {"name"})
        current = self._user(name)
        changes = self.fields.changes(body)
        _needs_a_credential(replace(current, **changes))
        try:
            # The cache writes a revocation when credentials change: every node ends the sessions.
            self.gateway.users.update(name, **changes)
        except NoSuchUser:
            raise ApiError(404, f"no user '{name}'") from None
        except UsersFileError as exc:
            raise ApiError(422, str(exc)) from None
        return json_response(200, user_json(self._user(name)))

    def delete_user(self, request: Request) -> Response:
        name = request.params["name"]
        try:
            self.gateway.users.remove(name)
        except NoSuchUser:
            raise ApiError(404, f"no user '{name}'") from None
        return Response(204)

    def list_sessions(self, request: Request) -> Response:
        return json_response(200, [
            {"id": s.id, "user": s.user, "protocol": s.protocol, "ip": s.ip, "node": s.node,
             "started": _rfc3339(s.started), "bytes": s.bytes}
            for s in self.gateway.store.list_sessions()])

    def end_session(self, request: Request) -> Response:
        session_id = request.params["id"]
        store = self.gateway.store
        if not any(s.id == session_id for s in store.list_sessions()):
            raise ApiError(404, f"no session '{session_id}'")
        # The node holding it ends it when the change feed brings the revocation;
        # the row goes now, so the list no longer shows it (a dead node's too).
        store.revoke(session_id=session_id)
        store.remove_session(session_id)
        return Response(204)

    def list_bans(self, request: Request) -> Response:
        return json_response(200, [{"ip": ban.key, "until": _rfc3339(ban.until)}
                                   for ban in self.gateway.store.list_bans()])

    def lift_ban(self, request: Request) -> Response:
        ip = request.params["ip"]
        if not self.gateway.store.unban(ip):
            raise ApiError(404, f"'{ip}' is not banned")
        # Every process reloads its bans from the change feed; this one at once.
        self.gateway.defender.load_bans()
        return Response(204)
