"""The in-process API on top of the network: ``Sam2Model`` (images), the video model and
its sessions, image decoding and transforms, the caches, checkpoint loading.

Torch and OpenCV live here; nothing here knows gRPC, protos, stores or the tiers.
"""
