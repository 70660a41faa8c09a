"""The committed modules of serve_app/proto are what grpcio-tools makes of raycache.proto."""

import pickle
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2

from serve_app.proto import generate, raycache_pb2

STALE = "is stale: run `python -m serve_app.proto.generate` and commit the result"


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(path.name for path in written) == sorted(
        name for proto in generate.PROTOS for name in generate.generated_names(proto)
    )
    for path in written:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{committed.name} {STALE}"


def test_the_messages_belong_to_the_importable_module() -> None:
    """Ray Serve pickles the messages; unpickling imports the module they name."""
    source = (generate.PROTO_DIR / "raycache_pb2_grpc.py").read_text()
    assert "from serve_app.proto import raycache_pb2 as" in source
    assert "\nimport raycache_pb2" not in source
    assert raycache_pb2.CompletionRequest.__module__ == "serve_app.proto.raycache_pb2"
    message = raycache_pb2.CompletionRequest(model="m", text="hi")
    assert pickle.loads(pickle.dumps(message)) == message


def test_the_servicer_function_serve_is_configured_with_exists() -> None:
    from serve_app.proto import raycache_pb2_grpc

    assert callable(raycache_pb2_grpc.add_RayCacheServicer_to_server)


def test_the_loaded_descriptor_is_the_protos(tmp_path: Path) -> None:
    """Independent of the grpcio-tools version: the schema itself, as protoc compiles it now."""
    from grpc_tools import protoc

    descriptor_set = tmp_path / "raycache.pb"
    argv = ["protoc", f"-I{generate.ROOT}", f"--descriptor_set_out={descriptor_set}"]
    assert protoc.main([*argv, str(generate.PACKAGE_DIR / "raycache.proto")]) == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    _drop_json_names(compiled.message_type)  # protoc adds them here, not to generated code
    loaded = descriptor_pb2.FileDescriptorProto.FromString(raycache_pb2.DESCRIPTOR.serialized_pb)
    assert loaded == compiled, f"raycache_pb2.py {STALE}"
    assert loaded.package == "raycache.v1"
    (service,) = loaded.service
    assert service.name == "RayCache"
    assert [(m.name, m.server_streaming) for m in service.method] == [
        ("Complete", False),
        ("CompleteStream", True),
        ("Chat", False),
        ("ChatStream", True),
        ("Embed", False),
        ("Models", False),
        ("Stats", False),
    ]


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)
