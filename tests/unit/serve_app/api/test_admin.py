"""Admin inputs: bearer tokens and the bodies of the version and invalidation routes."""

from __future__ import annotations

import pytest

from serve_app.api.admin import parse_invalidation, parse_version_update
from serve_app.errors import InvalidRequest


def test_a_checkpoint_must_lie_in_the_checkpoint_dir(tmp_path):
    inside = tmp_path / "ckpt" / "v2.safetensors"
    inside.parent.mkdir()
    inside.write_bytes(b"weights")
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"weights")
    root = str(inside.parent)
    assert parse_version_update({"version": "2", "checkpoint": str(inside)}, root).checkpoint
    for path in (
        str(outside),
        f"{root}/../elsewhere.safetensors",
        "/etc/passwd",
        f"{root}/v2.safetensors\0.txt",  # os.path raises ValueError on a NUL
    ):
        with pytest.raises(InvalidRequest) as raised:
            parse_version_update({"version": "2", "checkpoint": path}, root)
        assert raised.value.param == "checkpoint"
    with pytest.raises(InvalidRequest, match="checkpoint_dir"):
        parse_version_update({"version": "2", "checkpoint": str(inside)}, None)


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


def test_a_checkpoint_is_what_the_models_kind_loads(tmp_path):
    directory = tmp_path / "v2"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    file = tmp_path / "v2.safetensors"
    file.write_bytes(b"weights")
    root = str(tmp_path)
    assert parse_version_update({"version": "2", "checkpoint": str(directory)}, root, "hf")
    assert parse_version_update({"version": "2", "checkpoint": str(file)}, root, "tiny-gpt")
    for path, kind in ((file, "hf"), (directory, "tiny-gpt"), (tmp_path, "hf")):
        with pytest.raises(InvalidRequest) as raised:
            parse_version_update({"version": "2", "checkpoint": str(path)}, root, kind)
        assert raised.value.param == "checkpoint", (path, kind)
