"""/api/v1/openapi.json against the handlers: the same routes, and the same bodies accepted."""
from __future__ import annotations

import jsonschema
import pytest
from openapi_spec_validator import validate

from gateway.admin import openapi
from tests.admin.helpers import NEW_PASSWORD, api_request, call
from tests.conftest import wait_for
from tests.sftp.helpers import sftp_client


def schema(document: dict, name: str) -> jsonschema.Draft202012Validator:
    """A validator for one component schema, its $refs resolved within the document."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": document["components"]})


def test_openapi_json_is_served_without_a_token_and_is_valid_openapi_3_1(api):
    answer = api_request(api.admin_port, "GET", "/openapi.json")
    assert answer.status == 200
    document = answer.json()
    assert document == openapi.document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_documented_operation_is_routed_and_every_route_documented(api):
    router = api.gateway.frontends[-1].build_app()
    routed = {(template.removeprefix(openapi.PREFIX), method.lower())
              for template, method in router.routes() if template.startswith(openapi.PREFIX + "/")}
    documented = {(path, method) for path, item in openapi.document()["paths"].items() for method in item}
    assert routed == documented


def test_every_guarded_operation_documents_401_and_every_body_400_and_422():
    for path, item in openapi.document()["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            if operation.get("security") != []:
                assert {"401", "403"} <= codes, (method, path)
            if "requestBody" in operation:
                assert {"400", "422"} <= codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)


# Bodies for POST /users: the schema rejects exactly those the handler answers 400.
BODIES = [
    {"name": "b1", "password": NEW_PASSWORD},
    {"name": "b2", "password": NEW_PASSWORD, "home": "local:/b2", "keys": [], "quota_bytes": 0,
     "quota_files": 5, "disabled": True, "permissions": {"/": ["list"]},
     "mounts": {"/m": {"target": "local:/m"}, "/n": {"target": "local:/n", "permissions": ["*"]}}},
    {"name": "b3", "password": NEW_PASSWORD, "quota_bytes": -5},          # 422: a value, not a type
    {"name": "b4", "password": NEW_PASSWORD, "permissions": {"/": ["read"]}},
    {"name": "b5"},
    {"password": NEW_PASSWORD},
    {"name": ["b6"], "password": NEW_PASSWORD},
    {"name": "b7", "password": None},
    {"name": "b8", "password": NEW_PASSWORD, "keys": [1]},
    {"name": "b9", "password": NEW_PASSWORD, "permissions": ["/"]},
    {"name": "b10", "password": NEW_PASSWORD, "permissions": {"/": [True]}},
    {"name": "b11", "password": NEW_PASSWORD, "mounts": {"/m": {"target": 1}}},
    {"name": "b12", "password": NEW_PASSWORD, "mounts": {"/m": {"target": "local:/m", "ro": True}}},
    {"name": "b13", "password": NEW_PASSWORD, "quota_files": 1.5},
    {"name": "b14", "password": NEW_PASSWORD, "disabled": 0},
    {"name": "b15", "password": NEW_PASSWORD, "extra": 1},
]


def test_post_users_answers_400_exactly_for_the_bodies_the_schema_rejects(api):
    validator = schema(openapi.document(), "NewUser")
    for body in BODIES:
        schema_ok = validator.is_valid(body)
        answer = call(api, "POST", "/users", body)
        assert (answer.status == 400) == (not schema_ok), (body, answer.status, answer.body)
        assert answer.status in (201, 400, 422), (body, answer.body)


PATCHES = [
    {},
    {"quota_files": 2},
    {"password": NEW_PASSWORD, "disabled": False},
    {"name": "alice"},
    {"keys": "x"},
    {"home": None},
]


def test_patch_answers_400_exactly_for_the_bodies_the_schema_rejects(api):
    validator = schema(openapi.document(), "UserChanges")
    for body in PATCHES:
        answer = call(api, "PATCH", "/users/alice", body)
        assert (answer.status == 400) == (not validator.is_valid(body)), (body, answer.body)


def test_answers_match_their_documented_schemas(api):
    document = openapi.document()
    user, session, ban = (schema(document, name) for name in ("User", "Session", "Ban"))
    created = call(api, "POST", "/users", {"name": "bob", "password": NEW_PASSWORD,
                                           "mounts": {"/m": {"target": "local:/m"}}})
    assert created.status == 201
    user.validate(created.json())
    for listed in call(api, "GET", "/users").json():
        user.validate(listed)
    with sftp_client(api.sftp_port, "bob", NEW_PASSWORD):
        wait_for(lambda: call(api, "GET", "/sessions").json(), "a session listed")
        for row in call(api, "GET", "/sessions").json():
            session.validate(row)
    api.gateway.store.ban("192.0.2.1", 4102444800.0)
    for row in call(api, "GET", "/bans").json():
        ban.validate(row)
    error = schema(document, "Error")
    for answer in (call(api, "GET", "/users/nobody"), call(api, "POST", "/users", {"name": 1}),
                   call(api, "GET", "/users", token="wrong")):
        error.validate(answer.json())


@pytest.mark.parametrize("name", ["User", "NewUser", "UserChanges", "Session", "Ban", "Error", "Mount"])
def test_each_schema_is_a_valid_json_schema(name):
    jsonschema.Draft202012Validator.check_schema(openapi.SCHEMAS[name])
