"""Writes the tiers' flag / environment tables into README.md (between the markers).

    python scripts/settings_table.py          # rewrite README.md
    python scripts/settings_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decoder_service.cli import DecoderSettings  # noqa: E402
from encoder_service.cli import EncoderSettings  # noqa: E402
from sam2_shared.serving.settings import env_name, mask_secret  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import readme_section  # noqa: E402

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def tables() -> str:
    out = []
    for command, cls in (("sam2-encoder", EncoderSettings), ("sam2-decoder", DecoderSettings)):
        out += [f"#### `{command}`", "", "| flag | environment | default | meaning |",
                "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            default = "" if field.default is dataclasses.MISSING else field.default
            shown = mask_secret(default) if field.metadata.get("secret") else default
            meaning = str(field.metadata.get("help", "")).replace("|", "\\|")
            out.append(f"| `{flag}` | `{env_name(field)}` | `{shown}` | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(readme_section.main(__doc__.splitlines()[0], START, END, tables,
                                 "python scripts/settings_table.py"))
