"""Tests of sam2_shared.store that need no server (memory and diskcache backends)."""
