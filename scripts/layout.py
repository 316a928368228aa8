"""Writes the README's layout section (between the markers): one line per folder, from each
package's docstring, so the description cannot go stale.

    python scripts/layout.py          # rewrite README.md
    python scripts/layout.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_section  # noqa: E402

START, END = "<!-- layout:start -->", "<!-- layout:end -->"
# Folders that are not Python packages, and what they hold.
OTHER = {
    "protos/sam2/v1": "the API, the source of truth (package sam2.v1, Google AIP style)",
    "bench": "benchmarks, side by side with Meta's implementation (results: BENCHMARKS.md)",
    "k8s": "Kubernetes manifests: kustomize base + cpu/gpu overlays",
    "docker": "container images of both tiers, Prometheus config",
    "docs": "reference pages (metrics)",
    "scripts": "set-up, test and demo commands; generators of protos and README tables",
}
ORDER = ("protos/sam2/v1", "sam2_shared", "encoder_service", "decoder_service", "tests", "bench",
         "k8s", "docker", "docs", "scripts")
WIDTH = 30


def summary(package: Path) -> str:
    """The first sentence of a package's docstring."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".").replace("``", "")


def folders() -> list[tuple[str, str]]:
    rows = []
    for top in ORDER:
        path = ROOT / top
        if top in OTHER:
            rows.append((top, OTHER[top]))
            continue
        packages = sorted(p.parent for p in path.rglob("__init__.py")
                          if "__pycache__" not in p.parts)
        for package in packages:
            relative = package.relative_to(ROOT).as_posix()
            if relative.startswith("sam2_shared/api/"):
                continue  # sam2_shared/api covers its generated subpackage
            rows.append((relative, summary(package)))
    return rows


def render_block() -> str:
    lines = ["```"]
    for folder, text in folders():
        wrapped = textwrap.wrap(text, 100 - WIDTH) or [""]
        lines.append(f"{folder + '/':<{WIDTH}}{wrapped[0]}")
        lines += [" " * WIDTH + more for more in wrapped[1:]]
    lines.append("```")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(readme_section.main(__doc__.splitlines()[0], START, END, render_block,
                                 "python scripts/layout.py"))
