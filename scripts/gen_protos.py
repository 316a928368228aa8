"""Regenerate ``sam2_shared/api/v1/`` from ``protos/sam2/v1/*.proto``.

Usage: ``python scripts/gen_protos.py [--out DIR]`` (default: ``sam2_shared/api``).

protoc names generated modules after the include path, so ``-I protos`` yields
``sam2.v1.*_pb2`` modules that import each other as ``from sam2.v1 import ...``.
A top-level ``sam2`` package would collide with Meta's ``sam2`` (installed for
the parity tests), so the output is moved to ``sam2_shared/api/v1/`` and those
imports are rewritten. The protobuf full names (``sam2.v1.*``) and therefore the
wire method paths do not change. The generator is pinned so that the committed
output is reproducible; ``tests/unit/test_protos.py`` checks that it is.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = Path("sam2") / "v1"
DEFAULT_OUT = REPO_ROOT / "sam2_shared" / "api"
PYTHON_PACKAGE = "sam2_shared.api.v1"
GRPCIO_TOOLS_VERSION = "1.85.1"

_PACKAGE_INIT = (
    '"""Generated protobuf and gRPC code for the sam2.v1 API. Do not edit.\n\n'
    'Regenerate with ``python scripts/gen_protos.py``.\n"""\n'
)


def _include_dirs() -> list[Path]:
    """protoc include dirs: ours, protobuf's well-known types, googleapis' protos."""
    import google.rpc.status_pb2
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # googleapis-common-protos ships google/rpc/*.proto next to the generated modules.
    googleapis = Path(google.rpc.status_pb2.__file__).parent.parent.parent
    if not (googleapis / "google" / "rpc" / "status.proto").is_file():
        raise RuntimeError(f"google/rpc/status.proto not found under {googleapis}")
    return [PROTO_ROOT, well_known, googleapis]


def _rewrite_imports(text: str) -> str:
    """Point generated imports and module names at ``sam2_shared.api.v1``."""
    text = re.sub(r"\bfrom sam2\.v1 import\b", f"from {PYTHON_PACKAGE} import", text)
    # The module name passed to BuildTopDescriptorsAndMessages, e.g. 'sam2.v1.common_pb2'.
    text = re.sub(r"'sam2\.v1\.(\w+_pb2)'", rf"'{PYTHON_PACKAGE}.\1'", text)
    # The version-mismatch message names the generated file.
    text = text.replace("generated code in sam2/v1/", "generated code in sam2_shared/api/v1/")
    return text


def generate(out_dir: Path) -> list[Path]:
    """Generate the API package into ``out_dir`` (``<out_dir>/v1/*``); return the files."""
    installed = metadata.version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise RuntimeError(
            f"grpcio-tools {installed} is installed; the committed code is generated with "
            f"{GRPCIO_TOOLS_VERSION} (pip install grpcio-tools=={GRPCIO_TOOLS_VERSION})"
        )
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc"]
        args += [f"-I{d}" for d in _include_dirs()]
        args += [f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        # Relative paths keep the include-path-based module names stable.
        args += [str(p.relative_to(PROTO_ROOT)) for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see its messages above")

        target = out_dir / "v1"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (out_dir / "__init__.py").write_text(_PACKAGE_INIT)
        (target / "__init__.py").write_text(_PACKAGE_INIT)
        written = [out_dir / "__init__.py", target / "__init__.py"]
        for generated in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            destination = target / generated.name
            destination.write_text(_rewrite_imports(generated.read_text()))
            written.append(destination)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="API package directory")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
