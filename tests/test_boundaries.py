"""Import boundaries between the packages, checked on the source with ``ast`` (nothing is run).

- the tiers never import each other (``encoder_service`` <-> ``decoder_service``);
- the network (``sam2_shared/model/``) knows nothing of gRPC, protobuf, stores, the generated
  API, settings, servers or the tiers;
- the generated API (``sam2_shared.api``) is imported only where protos are translated: the
  wire module, the shared server and its error mapping, the client and the two servicers.

Packages or files that do not exist yet are simply not checked; the rules apply as they appear.
Every import counts, including those under ``if TYPE_CHECKING:`` or inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sam2_shared", "encoder_service", "decoder_service")

API = "sam2_shared.api"
API_IMPORTERS = {
    "sam2_shared/wire.py",
    "sam2_shared/server.py",
    "sam2_shared/grpc_errors.py",
    "sam2_shared/client.py",
    "encoder_service/servicer.py",
    "decoder_service/servicer.py",
    "decoder_service/tracking_servicer.py",
}

# What the network must not import: by top-level name, by module prefix, by last component.
MODEL_FORBIDDEN_TOP = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "encoder_service",
                       "decoder_service", "redis", "boto3", "diskcache")
MODEL_FORBIDDEN_PREFIXES = (
    "google.protobuf",
    "sam2_shared.store",
    API,
    "sam2_shared.server",
    "sam2_shared.wire",
    "sam2_shared.grpc_errors",
    "sam2_shared.client",
    "sam2_shared.settings",
)
MODEL_FORBIDDEN_COMPONENTS = ("settings", "server", "servicer", "cli")


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


def _forbidden_for_model(module: str) -> bool:
    parts = module.split(".")
    return (
        parts[0] in MODEL_FORBIDDEN_TOP
        or any(_imports({module}, prefix) for prefix in MODEL_FORBIDDEN_PREFIXES)
        or any(part in MODEL_FORBIDDEN_COMPONENTS for part in parts)
    )


def _violations(root: Path, packages: tuple[str, ...], bad: Callable[[str], bool]) -> dict:
    """{file: [offending imports]} over the packages that exist under ``root``."""
    found = {}
    for path in _source_files(root, *packages):
        offending = sorted(m for m in _imports_of(path, root) if bad(m))
        if offending:
            found[path.relative_to(root).as_posix()] = offending
    return found


def tier_violations(root: Path, tier: str, other: str) -> dict:
    return _violations(root, (tier,), lambda m: _imports({m}, other))


def shared_violations(root: Path) -> dict:
    tiers = ("encoder_service", "decoder_service")
    return _violations(root, ("sam2_shared",), lambda m: any(_imports({m}, t) for t in tiers))


def model_violations(root: Path) -> dict:
    return _violations(root, ("sam2_shared/model",), _forbidden_for_model)


def api_violations(root: Path) -> list[str]:
    offenders = []
    for path in _source_files(root, *PACKAGES):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("sam2_shared/api/") or relative in API_IMPORTERS:
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
    assert len(_source_files(ROOT, "sam2_shared/model")) >= 5
    # The parser reads the real tree: the predictor does import the network.
    assert _imports(_imports_of(ROOT / "sam2_shared" / "predictor.py"), "sam2_shared.model")


def test_checkers_find_violations_in_a_tree_that_has_them(tmp_path: Path) -> None:
    files = {
        "encoder_service/__init__.py": "",
        "encoder_service/encoder.py": "from decoder_service.decoder import decode\n",
        "decoder_service/__init__.py": "",
        "decoder_service/cli.py": "import encoder_service.settings\n",
        "decoder_service/servicer.py": "from sam2_shared.api.v1 import decoder_pb2\n",
        "sam2_shared/__init__.py": "",
        "sam2_shared/wire.py": "from .api.v1 import common_pb2\n",
        "sam2_shared/masks.py": "from sam2_shared import api\n",
        "sam2_shared/caches.py": "from decoder_service import decoder\n",
        "sam2_shared/model/__init__.py": "from .hiera import Hiera\n",
        "sam2_shared/model/hiera.py": "import grpc\nfrom ..store import base\n",
        "sam2_shared/model/neck.py": "import torch\nfrom sam2_shared.errors import Sam2Error\n",
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
    assert list(shared_violations(tmp_path)) == ["sam2_shared/caches.py"]
    assert model_violations(tmp_path) == {
        "sam2_shared/model/hiera.py": ["grpc", "sam2_shared.store", "sam2_shared.store.base"]
    }
    assert api_violations(tmp_path) == ["sam2_shared/masks.py"]


# ----- the rules on this repository ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "other"),
    [("encoder_service", "decoder_service"), ("decoder_service", "encoder_service")],
)
def test_tiers_do_not_import_each_other(tier: str, other: str) -> None:
    assert tier_violations(ROOT, tier, other) == {}


def test_shared_code_imports_no_tier() -> None:
    assert shared_violations(ROOT) == {}


def test_network_knows_nothing_of_grpc_stores_api_or_servers() -> None:
    assert model_violations(ROOT) == {}


@pytest.mark.parametrize(
    "module",
    ["grpc", "grpc_status.rpc_status", "google.protobuf.message", "sam2_shared.store.redis_store",
     "sam2_shared.api.v1.common_pb2", "sam2_shared.server", "encoder_service.settings",
     "sam2_shared.settings"],
)
def test_network_rule_catches(module: str) -> None:
    assert _forbidden_for_model(module)


@pytest.mark.parametrize(
    "module", ["torch.nn.functional", "sam2_shared.errors", "sam2_shared.model.config", "math"]
)
def test_network_rule_allows(module: str) -> None:
    assert not _forbidden_for_model(module)


def test_generated_api_is_imported_only_where_protos_are_translated() -> None:
    assert api_violations(ROOT) == []
