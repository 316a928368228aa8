"""Regenerate the TypeScript client ``clients/ts/src/gen/`` from ``protos/sam2/v1/*.proto``.

Usage: ``python scripts/gen_ts_client.py [--out DIR]`` (default: the repository root; the
template ``clients/ts/buf.gen.yaml`` puts the files under ``clients/ts/src/gen``).

``npx buf generate`` runs the pinned ``@bufbuild/protoc-gen-es`` (``npm ci`` first). Its input
is a descriptor image that protoc builds with the include dirs the Python code is generated
with (``scripts/gen_protos.py``), so googleapis' protos come from the googleapis-common-protos
wheel: the Buf registry is not needed (nor reachable everywhere we build).
``tests/unit/test_ts_client.py`` checks that the committed output is what this produces.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_protos  # noqa: E402

REPO_ROOT = gen_protos.REPO_ROOT
TEMPLATE = REPO_ROOT / "clients" / "ts" / "buf.gen.yaml"
GENERATED_DIR = Path("clients") / "ts" / "src" / "gen"
# Errors carry a google.rpc.ErrorInfo detail (sam2_shared/wire/status.py); clients decode it.
EXTRA_PROTOS = ("google/rpc/error_details.proto",)


def build_image(path: Path) -> None:
    """Write a descriptor image (FileDescriptorSet with imports and comments) of our protos."""
    from grpc_tools import protoc

    protos = sorted((gen_protos.PROTO_ROOT / gen_protos.PROTO_PACKAGE_DIR).glob("*.proto"))
    args = ["grpc_tools.protoc", *[f"-I{d}" for d in gen_protos._include_dirs()],
            "--include_imports", "--include_source_info", f"--descriptor_set_out={path}",
            *[str(p.relative_to(gen_protos.PROTO_ROOT)) for p in protos], *EXTRA_PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")


def generate(out_root: Path) -> Path:
    """Generate into ``out_root / clients/ts/src/gen``; return that folder."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "sam2-api.binpb"
        build_image(image)
        # protoc's image marks no file as an import, so buf would generate every file in it;
        # the well-known types are left out: @bufbuild/protobuf/wkt provides them.
        subprocess.run(["npx", "--no-install", "buf", "generate", str(image), "--template",
                        str(TEMPLATE), "--output", str(out_root), "--exclude-path",
                        "google/protobuf"], cwd=REPO_ROOT, check=True)
    return out_root / GENERATED_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output base directory")
    args = parser.parse_args(argv)
    for path in sorted(generate(args.out.resolve()).rglob("*.ts")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
