"""The committed TypeScript client (``clients/ts/src/gen``) and the page's bundle
(``decoder_service/web/static/app.js``) are what the pinned npm tools make from the sources now,
and the page type-checks against the client.

Both need the npm packages of ``package-lock.json`` (``npm ci``, done by scripts/setup_env.sh).
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import gen_ts_client  # noqa: E402

COMMITTED_CLIENT = REPO_ROOT / gen_ts_client.GENERATED_DIR
WEB = REPO_ROOT / "decoder_service" / "web"


@pytest.fixture(scope="module", autouse=True)
def npm_packages() -> None:
    if shutil.which("npx") is None or not (REPO_ROOT / "node_modules" / ".bin").is_dir():
        pytest.fail("the npm tools are missing: run `npm ci` (scripts/setup_env.sh does)")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_regenerating_the_typescript_client_changes_nothing(tmp_path: Path) -> None:
    fresh = gen_ts_client.generate(tmp_path)
    assert _files(fresh) == _files(COMMITTED_CLIENT)
    _, mismatch, errors = filecmp.cmpfiles(fresh, COMMITTED_CLIENT, _files(fresh), shallow=False)
    assert mismatch == [] and errors == [], "run: python scripts/gen_ts_client.py"
    assert "export const DecoderService" in (fresh / "sam2/v1/decoder_pb.ts").read_text()


def test_the_committed_page_bundle_is_built_from_the_sources(tmp_path: Path) -> None:
    bundle = tmp_path / "app.js"
    subprocess.run(["node", str(WEB / "build.mjs"), str(bundle)], cwd=REPO_ROOT, check=True)
    committed = WEB / "static" / "app.js"
    assert bundle.read_bytes() == committed.read_bytes(), "run: npm run build:web"


def test_the_page_and_the_client_type_check() -> None:
    # esbuild strips types without checking them; tsc checks the page against the client.
    result = subprocess.run(["npx", "--no-install", "tsc", "-p", str(WEB)], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
