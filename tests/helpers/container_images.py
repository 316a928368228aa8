"""The image names scripts/build_images.sh tags: <its REGISTRY>/<tier>:<pyproject version>."""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT


def built_image_names() -> dict[str, str]:
    """Tier ("encoder", "decoder") -> the image name the build script gives it."""
    script = (REPO_ROOT / "scripts" / "build_images.sh").read_text()
    registry = re.search(r'^REGISTRY="([^"]+)"$', script, re.MULTILINE)
    version = re.search(r'^version = "([^"]+)"$', (REPO_ROOT / "pyproject.toml").read_text(),
                        re.MULTILINE)
    if not (registry and version and "for tier in encoder decoder; do" in script):
        raise ValueError("scripts/build_images.sh or pyproject.toml changed shape")
    return {tier: f"{registry.group(1)}/{tier}:{version.group(1)}"
            for tier in ("encoder", "decoder")}
