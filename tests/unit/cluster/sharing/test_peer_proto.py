"""The committed modules of cluster/sharing/proto are what grpcio-tools makes of peer.proto."""

from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2

from cluster.sharing.proto import generate, peer_pb2

STALE = "is stale: run `python -m cluster.sharing.proto.generate` and commit the result"


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(path.name for path in written) == sorted(
        name for proto in generate.PROTOS for name in generate.generated_names(proto)
    )
    for path in written:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{committed.name} {STALE}"


def test_the_grpc_module_imports_its_messages_from_the_package() -> None:
    source = (generate.PROTO_DIR / "peer_pb2_grpc.py").read_text()
    assert "from . import peer_pb2 as peer__pb2" in source
    assert "\nimport peer_pb2" not in source


def test_the_loaded_descriptor_is_the_protos(tmp_path: Path) -> None:
    """Independent of the grpcio-tools version: the schema itself, as protoc compiles it now."""
    from grpc_tools import protoc

    descriptor_set = tmp_path / "peer.pb"
    argv = ["protoc", f"-I{generate.PROTO_DIR}", f"--descriptor_set_out={descriptor_set}"]
    assert protoc.main([*argv, "peer.proto"]) == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    _drop_json_names(compiled.message_type)  # protoc adds them here, not to generated code
    loaded = descriptor_pb2.FileDescriptorProto.FromString(peer_pb2.DESCRIPTOR.serialized_pb)
    assert loaded == compiled, f"peer_pb2.py {STALE}"
    assert loaded.package == "raycache.peer.v1"
    assert [m.name for m in loaded.service[0].method] == [
        "GetResults",
        "PutResults",
        "Ping",
    ]


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)
