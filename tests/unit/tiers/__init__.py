"""Tier logic without gRPC (encoder_service.encoder, decoder_service.decoder) on the tiny model."""
