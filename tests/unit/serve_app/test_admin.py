"""Admin inputs: bearer tokens and the bodies of the version and invalidation routes."""

from __future__ import annotations

import pytest

from serve_app.admin import check_admin_token, parse_invalidation, parse_version_update
from serve_app.errors import InvalidRequest, Unauthorized


def test_admin_routes_are_open_without_a_token_and_closed_to_a_wrong_one():
    check_admin_token(None, None)
    check_admin_token("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(Unauthorized) as raised:
            check_admin_token(header, "s3cret")
        assert raised.value.http_status == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], "body"),
        ({}, "version"),
        ({"version": ""}, "version"),
        ({"version": "a b"}, "version"),
        ({"version": "2", "seed": -1}, "seed"),
        ({"version": "2", "seed": 1, "checkpoint": "/x"}, "body"),
        ({"version": "2", "timeout_s": 0}, "timeout_s"),
        ({"version": "2", "colour": "red"}, "colour"),
        ({"version": "2", "checkpoint": "/no/such/file.safetensors"}, "checkpoint"),
    ],
)
def test_a_bad_version_body_names_its_field(body, param):
    with pytest.raises(InvalidRequest) as raised:
        parse_version_update(body)
    assert raised.value.param == param


def test_a_version_body_parses():
    update = parse_version_update({"version": "2", "seed": 7, "force": True})
    assert (update.version, update.seed, update.checkpoint, update.force) == ("2", 7, None, True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "body"),
        ({"timeout_s": 5}, "body"),
        ({"key": "XYZ"}, "key"),
        ({"model": ""}, "model"),
        ({"tenant": "t", "extra": 1}, "extra"),
    ],
)
def test_a_bad_invalidation_body_names_its_field(body, param):
    with pytest.raises(InvalidRequest) as raised:
        parse_invalidation(body)
    assert raised.value.param == param
