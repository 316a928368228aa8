"""Import boundaries: the folder says what a module is for and what it may import.

Checked on the source with ``ast`` (nothing is run), one rule per folder of ``sam2_shared``
(``FOLDER_RULES``): what it must not import, by top-level name or module prefix. Every import
counts, including those under ``if TYPE_CHECKING:`` or inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. Besides:

- the tiers never import each other (``encoder_service`` <-> ``decoder_service``), and no
  shared code imports a tier;
- the generated API (``sam2_shared.api``) is imported only where protos are translated: the
  wire package, the server, the clients and the servicers;
- ``sam2_shared.client`` (and the wire layer it uses) imports without torch and without
  OpenCV: checked for real, in a subprocess where both are unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("sam2_shared", "encoder_service", "decoder_service")
TIERS = ("encoder_service", "decoder_service")

API = "sam2_shared.api"
API_IMPORTER_PREFIXES = ("sam2_shared/wire/", "sam2_shared/client/")
API_IMPORTERS = {
    "sam2_shared/serving/server.py",
    "sam2_shared/serving/encoder_client.py",
    "encoder_service/servicer.py",
    "decoder_service/servicer.py",
    "decoder_service/tracking_servicer.py",
}

GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.protobuf", "google.rpc")
STORES = ("redis", "boto3", "botocore", "diskcache")

# folder -> (what it is for, what it must not import)
FOLDER_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sam2_shared/model": (
        "the network, pure torch",
        (*GRPC, *STORES, "cv2", "PIL", "numpy", "prometheus_client", API, "sam2_shared.wire",
         "sam2_shared.serving", "sam2_shared.client", "sam2_shared.store",
         "sam2_shared.inference", *TIERS),
    ),
    "sam2_shared/inference": (
        "the in-process API: Sam2Model, video, images, caches, checkpoints",
        (*GRPC, *STORES, "prometheus_client", API, "sam2_shared.wire", "sam2_shared.serving",
         "sam2_shared.client", "sam2_shared.store", *TIERS),
    ),
    "sam2_shared/store": (
        "the shared store: backends and the one byte format",
        (*GRPC, "cv2", "PIL", "prometheus_client", API, "sam2_shared.wire",
         "sam2_shared.serving", "sam2_shared.client", "sam2_shared.inference", *TIERS),
    ),
    "sam2_shared/wire": (
        "proto <-> domain conversions, mask encodings, the status table",
        ("torch", *STORES, "prometheus_client", "sam2_shared.inference", "sam2_shared.serving",
         "sam2_shared.client", "sam2_shared.store", "sam2_shared.model", *TIERS),
    ),
    "sam2_shared/client": (
        "the remote API: numpy, grpcio and protobuf (OpenCV only to decode images)",
        ("torch", *STORES, "prometheus_client", "grpc_health", "grpc_reflection",
         "sam2_shared.serving", "sam2_shared.store", "sam2_shared.model.build",
         "sam2_shared.inference.sam2_model", "sam2_shared.inference.video", *TIERS),
    ),
    "sam2_shared/serving": (
        "tier plumbing: settings, server, auth, TLS, metrics, batching",
        ("torch", "cv2", "sam2_shared.inference", "sam2_shared.model.build", *TIERS),
    ),
}
# Deliberate exceptions, each with its reason.
ALLOWED = {
    # tensors out of Sam2Client where torch is installed (numpy otherwise), imported on demand
    ("sam2_shared/client/__init__.py", "torch"),
    # sam2-embed's s3:// sources list and read a bucket, imported only for such a source
    ("sam2_shared/client/embed_sources.py", "boto3"),
    ("sam2_shared/client/embed_sources.py", "botocore"),
    ("sam2_shared/client/embed_sources.py", "botocore.config"),
    ("sam2_shared/client/embed_sources.py", "botocore.config.Config"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str | None, level: int, current: str, is_package: bool) -> str:
    """Absolute name of ``from <level dots><module> import ...`` inside ``current``."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]  # a module's own package is its parent
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_modules(source: str, current: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` (the module ``current``) may import.

    ``from a import b`` yields both ``a`` and ``a.b``, since ``b`` may be a submodule.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, current, is_package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                found.add(first.value)
    found.discard("")
    return found


def _imports(modules: set[str], prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in modules)


def _source_files(root: Path, *packages: str) -> list[Path]:
    files: list[Path] = []
    for package in packages:
        directory = root / package
        if directory.is_dir():
            files.extend(sorted(directory.rglob("*.py")))
    return files


def _imports_of(path: Path, root: Path = ROOT) -> set[str]:
    return imported_modules(
        path.read_text(encoding="utf-8"), module_name(path, root), _is_package(path)
    )


def folder_violations(root: Path, folder: str, forbidden: tuple[str, ...]) -> dict:
    """{file: [offending imports]} of one folder under ``root``."""
    def bad(module: str) -> bool:
        return any(_imports({module}, prefix) for prefix in forbidden)

    found = {}
    for path in _source_files(root, folder):
        relative = path.relative_to(root).as_posix()
        offending = sorted(m for m in _imports_of(path, root)
                           if bad(m) and (relative, m) not in ALLOWED)
        if offending:
            found[relative] = offending
    return found


def tier_violations(root: Path, tier: str, other: str) -> dict:
    return folder_violations(root, tier, (other,))


def shared_violations(root: Path) -> dict:
    return folder_violations(root, "sam2_shared", TIERS)


def api_violations(root: Path) -> list[str]:
    offenders = []
    for path in _source_files(root, *PACKAGES):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("sam2_shared/api/", *API_IMPORTER_PREFIXES)) \
                or relative in API_IMPORTERS:
            continue
        if _imports(_imports_of(path, root), API):
            offenders.append(relative)
    return sorted(offenders)


# ----- the parser itself ------------------------------------------------------------------


def test_parser_sees_every_kind_of_import() -> None:
    source = """
import os.path, grpc
from typing import TYPE_CHECKING
from . import caches
from .store import disk_store
from ..api.v1 import common_pb2
if TYPE_CHECKING:
    from decoder_service.decoder import Decoder
def late():
    import importlib
    importlib.import_module("sam2_shared.api.v1.encoder_pb2")
    __import__("redis")
"""
    found = imported_modules(source, "sam2_shared.model.hiera")
    for expected in (
        "os.path",
        "grpc",
        "sam2_shared.model.caches",
        "sam2_shared.model.store.disk_store",
        "sam2_shared.api.v1.common_pb2",
        "decoder_service.decoder",
        "sam2_shared.api.v1.encoder_pb2",
        "redis",
    ):
        assert expected in found, expected
    # In a package's __init__, one dot is the package itself.
    assert "sam2_shared.model.hiera" in imported_modules(
        "from .hiera import Hiera", "sam2_shared.model", is_package=True
    )
    assert _imports({"sam2_shared.api.v1"}, API) and not _imports({"sam2_shared.apis"}, API)


def test_the_checked_tree_is_not_empty() -> None:
    for folder in FOLDER_RULES:
        assert _source_files(ROOT, folder), folder
    assert len(_source_files(ROOT, "sam2_shared/model")) >= 5
    # The parser reads the real tree: the in-process model does import the network.
    assert _imports(_imports_of(ROOT / "sam2_shared/inference/sam2_model.py"),
                    "sam2_shared.model")


def test_every_folder_of_sam2_shared_has_a_rule() -> None:
    folders = {p.parent.relative_to(ROOT).as_posix()
               for p in (ROOT / "sam2_shared").glob("*/__init__.py")}
    assert folders - {"sam2_shared/api"} == set(FOLDER_RULES)


def test_checkers_find_violations_in_a_tree_that_has_them(tmp_path: Path) -> None:
    files = {
        "encoder_service/__init__.py": "",
        "encoder_service/encoder.py": "from decoder_service.decoder import decode\n",
        "decoder_service/__init__.py": "",
        "decoder_service/cli.py": "import encoder_service.settings\n",
        "decoder_service/servicer.py": "from sam2_shared.api.v1 import decoder_pb2\n",
        "sam2_shared/__init__.py": "",
        "sam2_shared/wire/__init__.py": "from ..api.v1 import common_pb2\n",
        "sam2_shared/prompts.py": "from sam2_shared import api\n",
        "sam2_shared/inference/caches.py": "from decoder_service import decoder\n",
        "sam2_shared/model/__init__.py": "from .hiera import Hiera\n",
        "sam2_shared/model/hiera.py": "import grpc\nfrom ..store import base\n",
        "sam2_shared/model/neck.py": "import torch\nfrom sam2_shared.errors import Sam2Error\n",
        "sam2_shared/client/__init__.py": "import importlib\nimportlib.import_module('torch')\n",
        "sam2_shared/client/tracking.py": "from sam2_shared.serving import auth\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert tier_violations(tmp_path, "encoder_service", "decoder_service") == {
        "encoder_service/encoder.py": ["decoder_service.decoder", "decoder_service.decoder.decode"]
    }
    assert list(tier_violations(tmp_path, "decoder_service", "encoder_service")) == [
        "decoder_service/cli.py"
    ]
    assert list(shared_violations(tmp_path)) == ["sam2_shared/inference/caches.py"]
    assert folder_violations(tmp_path, "sam2_shared/model",
                             FOLDER_RULES["sam2_shared/model"][1]) == {
        "sam2_shared/model/hiera.py": ["grpc", "sam2_shared.store", "sam2_shared.store.base"]
    }
    # the allowed exception is the one file and module named, nothing else
    assert folder_violations(tmp_path, "sam2_shared/client",
                             FOLDER_RULES["sam2_shared/client"][1]) == {
        "sam2_shared/client/tracking.py": ["sam2_shared.serving", "sam2_shared.serving.auth"]
    }
    assert api_violations(tmp_path) == ["sam2_shared/prompts.py"]


# ----- the rules on this repository ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "other"),
    [("encoder_service", "decoder_service"), ("decoder_service", "encoder_service")],
)
def test_tiers_do_not_import_each_other(tier: str, other: str) -> None:
    assert tier_violations(ROOT, tier, other) == {}


def test_shared_code_imports_no_tier() -> None:
    assert shared_violations(ROOT) == {}


@pytest.mark.parametrize("folder", sorted(FOLDER_RULES))
def test_folder_keeps_its_rule(folder: str) -> None:
    assert folder_violations(ROOT, folder, FOLDER_RULES[folder][1]) == {}


def test_generated_api_is_imported_only_where_protos_are_translated() -> None:
    assert api_violations(ROOT) == []


HIDDEN_IMPORTS = r"""
import importlib.abc, sys

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "cv2"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, Hidden())
import sam2_shared
import sam2_shared.client
import sam2_shared.client.tracking
import sam2_shared.embedding
import sam2_shared.prompts
import sam2_shared.wire
import sam2_shared.wire.status
import sam2_shared.wire.tracking
from sam2_shared.client import Sam2Client
client = Sam2Client(decoder="127.0.0.1:1", array_type="numpy")
assert "torch" not in sys.modules and "cv2" not in sys.modules, sorted(sys.modules)
print("clean")
"""


def test_client_imports_without_torch_or_opencv() -> None:
    result = subprocess.run([sys.executable, "-c", HIDDEN_IMPORTS], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr
