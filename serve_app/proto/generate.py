"""Regenerate the modules of serve_app/proto/raycache.proto: `python -m serve_app.proto.generate`.

Writes `raycache_pb2.py`, `raycache_pb2.pyi` and `raycache_pb2_grpc.py` next to the `.proto` (or
into `--out`), with grpcio-tools (the `test` extra). The generated code is committed and never
edited by hand; `tests/unit/serve_app/test_api_proto.py` fails when it differs from what this
writes.

The `.proto` is compiled under its path from the repository root, so that its messages belong
to the module `serve_app.proto.raycache_pb2`: Ray Serve pickles them between its gRPC proxy and
the ingress, and unpickling imports their module by that name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

PROTO_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = PROTO_DIR.parents[1]
PACKAGE_DIR: Final = PROTO_DIR.relative_to(ROOT)
PROTOS: Final = ("raycache.proto",)


def generated_names(proto: str) -> tuple[str, str, str]:
    """The files generated from `proto`, e.g. `raycache.proto`."""
    stem = proto.removesuffix(".proto")
    return f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every proto of PROTOS into `out_dir`; returns the files written."""
    import tempfile

    from grpc_tools import protoc  # the test extra: not a runtime dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                *(str(PACKAGE_DIR / proto) for proto in PROTOS),
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status} on {', '.join(PROTOS)}")
        written: list[Path] = []
        for proto in PROTOS:
            for name in generated_names(proto):
                target = out_dir / name
                target.write_text((Path(scratch) / PACKAGE_DIR / name).read_text())
                written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="directory to write into")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
