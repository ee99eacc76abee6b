"""The admin REST API's OpenAPI 3.1 document, served at /api/v1/openapi.json.

Written by hand; tests/admin/test_openapi.py checks it against the router
(every path and method both ways) and against the request bodies the
handlers accept (a body the schema rejects is exactly a body answered 400).
"""
from __future__ import annotations

from typing import Any

PREFIX = "/api/v1"

_STRINGS = {"type": "array", "items": {"type": "string"}}
_PERMISSIONS = {
    "type": "object",
    "description": "path in the user's tree -> permission words (list, download, upload, overwrite, "
                   "delete, rename, mkdir, set_times, or *); the longest path containing a file decides",
    "additionalProperties": _STRINGS,
}
_MOUNT = {
    "type": "object",
    "required": ["target"],
    "additionalProperties": False,
    "properties": {
        "target": {"type": "string", "description": "backend:/path shown at the mount's path"},
        "permissions": {**_STRINGS, "description": "permission words (default [\"*\"])"},
    },
}
_USER_FIELDS: dict[str, Any] = {
    "password": {"type": "string", "writeOnly": True,
                 "description": "at least 8 characters; stored as an argon2id hash, never returned"},
    "keys": {**_STRINGS, "description": "OpenSSH public key lines"},
    "home": {"type": "string", "description": "backend:/path (default: the first backend, /NAME)"},
    "permissions": _PERMISSIONS,
    "mounts": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Mount"},
               "description": "virtual folders: path in the user's tree -> target"},
    "quota_bytes": {"type": "integer", "description": "0 means no limit; >= 0"},
    "quota_files": {"type": "integer", "description": "0 means no limit; >= 0"},
    "disabled": {"type": "boolean"},
}
_NAME = {"type": "string", "description": "letters, digits 0-9, '.', '_', '-', '@'; at most 64; "
                                          "in Unicode NFKC form, Latin, Greek and Cyrillic not mixed"}

SCHEMAS: dict[str, Any] = {
    "User": {
        "type": "object",
        "required": ["name", "keys", "home", "permissions", "mounts", "quota_bytes", "quota_files",
                     "disabled"],
        "additionalProperties": False,
        "properties": {"name": _NAME, **{k: v for k, v in _USER_FIELDS.items() if k != "password"}},
    },
    "NewUser": {
        "type": "object",
        "description": "a new user: a password, at least one key, or both",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {"name": _NAME, **_USER_FIELDS},
    },
    "UserChanges": {
        "type": "object",
        "description": "only the fields given change; a new password, new keys or disabled "
                       "end the user's sessions on every node",
        "additionalProperties": False,
        "properties": _USER_FIELDS,
    },
    "Mount": _MOUNT,
    "Session": {
        "type": "object",
        "required": ["id", "user", "protocol", "ip", "node", "started", "bytes"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"}, "user": {"type": "string"},
            "protocol": {"type": "string", "enum": ["sftp", "webdav"]},
            "ip": {"type": "string"}, "node": {"type": "string"},
            "started": {"type": "string", "format": "date-time"},
            "bytes": {"type": "integer"},
        },
    },
    "Ban": {
        "type": "object",
        "required": ["ip", "until"],
        "additionalProperties": False,
        "properties": {"ip": {"type": "string"}, "until": {"type": "string", "format": "date-time"}},
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "one line, as the CLI says it"},
                       "field": {"type": "string", "description": "the request field at fault"}},
    },
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


# Every operation that needs a token may also answer these.
_GUARDED = {
    "401": {**_error("no valid bearer token"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    "403": _error("the client address is outside [admin] allow_networks, or banned "
                  "(failed token checks count as failed logins)"),
    "503": _error("the state store cannot be reached"),
}
_BODY_ERRORS = {
    "400": _error("not a JSON object, an unknown field, or a field of the wrong type"),
    "413": _error("the body is larger than 1 MiB"),
    "422": _error("a value is invalid (the message names the field, as the CLI does)"),
}
_NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, responses: dict, *, body: str | None = None, params: list | None = None,
        public: bool = False) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": responses if public else {**responses, **_GUARDED}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        op["responses"].update(_BODY_ERRORS)
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    return op


def document() -> dict:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    no_content = {"description": "done"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway admin API", "version": "1"},
        "servers": [{"url": PREFIX}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "gateway admin token create NAME"}},
            "schemas": SCHEMAS,
        },
        "paths": {
            "/users": {
                "get": _op("list users", {"200": _json({"type": "array", "items": _ref("User")}, "users")}),
                "post": _op("create a user", {
                    "201": {**_json(_ref("User"), "created"),
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                    "409": _error("a user of that name exists, or of one that differs only in case"),
                }, body="NewUser"),
            },
            "/users/{name}": {
                "get": _op("read a user", {"200": _json(_ref("User"), "the user"),
                                           "404": _error("no such user")}, params=[_NAME_PARAM]),
                "patch": _op("change a user", {"200": _json(_ref("User"), "the changed user"),
                                               "404": _error("no such user")},
                             body="UserChanges", params=[_NAME_PARAM]),
                "delete": _op("remove a user (their files stay) and end their sessions",
                              {"204": no_content, "404": _error("no such user")}, params=[_NAME_PARAM]),
            },
            "/sessions": {
                "get": _op("list live sessions of every worker and node",
                           {"200": _json({"type": "array", "items": _ref("Session")}, "sessions")}),
            },
            "/sessions/{id}": {
                "delete": _op("end a session, on whichever node holds it",
                              {"204": no_content, "404": _error("no such session")},
                              params=[{"name": "id", "in": "path", "required": True,
                                       "schema": {"type": "string"}}]),
            },
            "/bans": {
                "get": _op("list the addresses banned now",
                           {"200": _json({"type": "array", "items": _ref("Ban")}, "bans")}),
            },
            "/bans/{ip}": {
                "delete": _op("lift a ban (and forget the address's failures)",
                              {"204": no_content, "404": _error("the address is not banned")},
                              params=[{"name": "ip", "in": "path", "required": True,
                                       "schema": {"type": "string"}}]),
            },
            "/openapi.json": {
                "get": _op("this document", {"200": {"description": "OpenAPI 3.1",
                                                     "content": {"application/json": {}}},
                                             "403": _error("the client address is outside "
                                                           "[admin] allow_networks")},
                           public=True),
            },
        },
    }
