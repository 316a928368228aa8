"""The encoder tier: batched image embedding into the shared store, over gRPC.

``encoder.Encoder`` holds the logic, ``servicer.EncoderServicer`` translates protos,
``cli`` is the ``sam2-encoder`` entry point.
"""
