"""Errors raised by the shared embedding store."""

from __future__ import annotations

from sam2_shared.errors import Sam2Error


class StoreUnavailableError(Sam2Error):
    """The store backend could not be reached or refused the operation.

    The message names the store by its masked URL, never its credentials.
    """

    reason = "STORE_UNAVAILABLE"
