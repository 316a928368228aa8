"""One way to keep a generated section of README.md current: the text between two markers
is replaced (or, with ``--check``, compared)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_section(readme: str, start: str, end: str, body: str) -> str:
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def main(description: str, start: str, end: str, body: Callable[[], str], command: str) -> int:
    """``command`` (how to regenerate) is named when ``--check`` finds the section stale."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    current = README.read_text()
    wanted = replace_section(current, start, end, body())
    if args.check:
        if wanted != current:
            print(f"README.md section {start} is out of date: run {command}")
            return 1
        return 0
    README.write_text(wanted)
    return 0
