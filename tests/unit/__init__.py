"""Unit tests: plain Python, no servers started (a gRPC server in process at most)."""
