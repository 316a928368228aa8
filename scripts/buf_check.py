"""``buf lint`` and ``buf breaking`` for ``protos/sam2/v1`` (config: ``buf.yaml``).

Usage::

    python scripts/buf_check.py lint                  # the rules buf.yaml states
    python scripts/buf_check.py breaking              # against the released API
    python scripts/buf_check.py snapshot --ref TAG    # record a release as the new baseline

buf comes from npm (``package.json``, installed into ``node_modules`` by
``scripts/setup_env.sh``). The Buf registry is not reachable from our machines, so buf cannot
fetch ``google/api`` and ``google/rpc`` itself: this script compiles the protos with the
pinned protoc of ``gen_protos`` (and the googleapis-common-protos wheel's files) into a buf
image, and gives buf that image limited to ``sam2/v1``.

The released API is ``protos/released/sam2-v1.binpb``: the image of ``protos/`` at the
commit ``protos/released/SOURCE`` names, made by ``snapshot``. Refresh both at a release.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_protos  # noqa: E402

REPO_ROOT = gen_protos.REPO_ROOT
CONFIG = REPO_ROOT / "buf.yaml"
RELEASED_IMAGE = REPO_ROOT / "protos" / "released" / "sam2-v1.binpb"
RELEASED_SOURCE = REPO_ROOT / "protos" / "released" / "SOURCE"
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"
OUR_PATH = "sam2/v1"


def build_image(proto_root: Path, out: Path, *, source_info: bool = True) -> Path:
    """Compile ``proto_root/sam2/v1/*.proto`` (and their imports) into a buf image."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_root))
                    for p in (proto_root / OUR_PATH).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {proto_root / OUR_PATH}")
    includes = [proto_root, *gen_protos._include_dirs()[1:]]  # ours, then the google files
    args = ["protoc", *[f"-I{d}" for d in includes], f"--descriptor_set_out={out}",
            "--include_imports", *(["--include_source_info"] if source_info else []), *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")
    return out


def buf(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the repository's buf; its output is returned, not printed."""
    if not BUF.exists():
        raise RuntimeError(f"{BUF} is missing: run npm ci (scripts/setup_env.sh does)")
    return subprocess.run([str(BUF), *args], capture_output=True, text=True, cwd=REPO_ROOT)


def lint(proto_root: Path = gen_protos.PROTO_ROOT) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as tmp:
        image = build_image(proto_root, Path(tmp) / "api.binpb")
        return buf("lint", str(image), "--path", OUR_PATH, "--config", str(CONFIG))


def breaking(proto_root: Path = gen_protos.PROTO_ROOT,
             against: Path = RELEASED_IMAGE) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as tmp:
        image = build_image(proto_root, Path(tmp) / "api.binpb", source_info=False)
        return buf("breaking", str(image), "--against", str(against), "--path", OUR_PATH,
                   "--config", str(CONFIG))


def protos_at(ref: str, folder: Path) -> Path:
    """``protos/`` as committed at ``ref``, extracted under ``folder``; returns its root."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "protos"],
                             cwd=REPO_ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "protos"


def snapshot(ref: str, out: Path = RELEASED_IMAGE) -> Path:
    """Write the image of ``protos/`` at ``ref`` to ``out``; for the released image, name
    the commit in SOURCE."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True
                            ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = protos_at(commit, Path(tmp))
        out.parent.mkdir(parents=True, exist_ok=True)
        build_image(root, out, source_info=False)
    if out == RELEASED_IMAGE:
        RELEASED_SOURCE.write_text(f"{commit}\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lint", help="buf lint protos/sam2/v1 with buf.yaml's rules")
    sub.add_parser("breaking", help="buf breaking against protos/released/sam2-v1.binpb")
    snap = sub.add_parser("snapshot", help="make protos/released/sam2-v1.binpb from a git ref")
    snap.add_argument("--ref", default="HEAD", help="the released commit or tag")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        print(snapshot(args.ref))
        return 0
    result = lint() if args.command == "lint" else breaking()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode == 0:
        print(f"buf {args.command}: no findings")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
