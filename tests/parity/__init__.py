"""Parity with Meta's reference implementation (PyPI sam2==1.1.0)."""
