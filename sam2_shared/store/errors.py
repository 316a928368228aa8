"""Errors raised by the shared embedding store (defined with every domain error)."""

from __future__ import annotations

from sam2_shared.errors import StoreUnavailableError

__all__ = ["StoreUnavailableError"]
