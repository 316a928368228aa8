"""Tests of sam2_shared.wire (conversions, mask encodings)."""
