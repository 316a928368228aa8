"""Integration tests against real processes on 127.0.0.1: the tiers, Redis, an S3 server,
Prometheus."""
