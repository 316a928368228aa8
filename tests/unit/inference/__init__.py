"""Tests of sam2_shared.inference (Sam2Model, video, images, caches, checkpoints)."""
