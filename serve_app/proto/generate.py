"""Regenerate the modules of serve_app/proto/raycache.proto: `python -m serve_app.proto.generate`.

Writes `raycache_pb2.py`, `raycache_pb2.pyi` and `raycache_pb2_grpc.py` next to the `.proto` (or
into `--out`), with grpcio-tools (the `test` extra). The generated code is committed and never
edited by hand; `tests/unit/serve_app/test_api_proto.py` fails when it differs from what this
writes. The same steps as `cluster.sharing.proto.generate`, whose directory is fixed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

PROTO_DIR: Final = Path(__file__).resolve().parent
PROTOS: Final = ("raycache.proto",)

# protoc writes `import raycache_pb2 as raycache__pb2`, which only works with serve_app/proto on
# sys.path; Ray Serve's proxy imports the servicer function as `serve_app.proto.raycache_pb2_grpc`.
_ABSOLUTE_IMPORT: Final = re.compile(r"^import (\w+_pb2) as (\w+)$", re.M)


def generated_names(proto: str) -> tuple[str, str, str]:
    """The files generated from `proto`, e.g. `raycache.proto`."""
    stem = proto.removesuffix(".proto")
    return f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every proto of PROTOS into `out_dir`; returns the files written."""
    from grpc_tools import protoc  # the test extra: not a runtime dependency

    out = str(out_dir)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {', '.join(PROTOS)}")
    written: list[Path] = []
    for proto in PROTOS:
        names = generated_names(proto)
        grpc_module = out_dir / names[2]
        grpc_module.write_text(
            _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", grpc_module.read_text())
        )
        written.extend(out_dir / name for name in names)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="directory to write into")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
