"""Tier logic without gRPC (encoder_service.encoder, decoder_service.segmenter) on the
tiny model."""
