"""Tier plumbing shared by the encoder and decoder tiers: settings, the gRPC server and its
interceptors (errors, API keys, tenancy), TLS, metrics, micro-batching, the client of the
encoder tier. The tiers' own logic lives in ``encoder_service/`` and ``decoder_service/``.
"""
