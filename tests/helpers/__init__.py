"""Shared test helpers: random official-format checkpoints, synthetic images, the tiers and
third-party servers as subprocesses, test PKI, Meta's reference."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
