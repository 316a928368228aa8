"""Tests of sam2_shared.client helpers that need no server (mask and video output)."""
