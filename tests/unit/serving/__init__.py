"""Tests of sam2_shared.serving (batching, the server and its error mapping)."""
