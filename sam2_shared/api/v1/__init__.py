"""Generated protobuf and gRPC code for the sam2.v1 API. Do not edit.

Regenerate with ``python scripts/gen_protos.py``.
"""
