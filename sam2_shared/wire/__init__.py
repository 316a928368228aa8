"""Every proto <-> domain conversion, for the servicers and the clients.

- ``segment``: images, Segment prompts, masks and predictions;
- ``tracking``: TrackingService prompts and frames;
- ``masks``: the mask encodings (COCO RLE, PNG, packed bits), no protos;
- ``status``: the one table between domain errors and gRPC status codes, both directions.

No torch here; the generated code (``sam2_shared.api``) is imported only in this package,
the servicers, the server and the clients.
"""

from sam2_shared.wire.segment import (
    LOGITS_NBYTES,
    LogitsResolver,
    box_from_proto,
    box_to_proto,
    embedding_to_proto,
    image_from_proto,
    image_to_proto,
    logits_from_bytes,
    logits_to_bytes,
    mask_encoding_from_proto,
    mask_format_to_proto,
    mask_from_proto,
    prediction_from_proto,
    predictions_from_proto,
    prompt_results_to_proto,
    prompt_to_proto,
    prompts_from_proto,
)

__all__ = [
    "LOGITS_NBYTES",
    "LogitsResolver",
    "box_from_proto",
    "box_to_proto",
    "embedding_to_proto",
    "image_from_proto",
    "image_to_proto",
    "logits_from_bytes",
    "logits_to_bytes",
    "mask_encoding_from_proto",
    "mask_format_to_proto",
    "mask_from_proto",
    "prediction_from_proto",
    "predictions_from_proto",
    "prompt_results_to_proto",
    "prompt_to_proto",
    "prompts_from_proto",
]
