"""Regenerate the Python stubs of proto/optserve/v1/optserve.proto (`make proto`).

The stubs are committed; tests/unit/test_proto_stubs.py runs `generate` into a temporary folder and
checks that the committed files equal a fresh run. This module must not be imported at run time.
"""
from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "optserve/v1/optserve.proto"
STUBS = ("optserve/v1/optserve_pb2.py", "optserve/v1/optserve_pb2.pyi", "optserve/v1/optserve_pb2_grpc.py")

# protoc writes imports relative to the include root (`from optserve.v1 import ...`); the stubs live
# in the import package optserve.proto, so the grpc stub's import is rewritten to match.
_PROTOC_IMPORT = "from optserve.v1 import optserve_pb2"
_PACKAGE_IMPORT = "from optserve.proto.optserve.v1 import optserve_pb2"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on the contract, writing the stubs under out_dir; return their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    grpc_stub = out_dir / STUBS[2]
    text = grpc_stub.read_text()
    if _PROTOC_IMPORT not in text:
        raise RuntimeError(f"{grpc_stub}: expected protoc's import line {_PROTOC_IMPORT!r}")
    grpc_stub.write_text(text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT))
    return [out_dir / s for s in STUBS]


if __name__ == "__main__":
    for path in generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(f"wrote {path}")
