"""The decoder tier: prompts + stored embeddings -> masks, served over gRPC (``sam2-decoder``)."""
