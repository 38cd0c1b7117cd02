"""Generates the gRPC stubs from protos/ into the repository root: `python -m tools.protogen`.

protos/cloudach/inference/v1/inference.proto becomes the module cloudach.inference.v1.inference_pb2,
so the generated imports are right as written and nothing is patched afterwards.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate() -> list[pathlib.Path]:
    """Compiles every .proto under protos/ and returns the files it compiled."""
    sources = sorted(PROTOS.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for source in sources:
        package_dir = ROOT / source.parent.relative_to(PROTOS)
        # Regular packages (not namespace ones) so that every tool finds the stubs.
        for folder in [package_dir, *package_dir.parents]:
            if folder == ROOT:
                break
            (folder / "__init__.py").touch(exist_ok=True)
    return sources


if __name__ == "__main__":
    for path in generate():
        print(f"generated stubs for {path.relative_to(ROOT)}", file=sys.stderr)
