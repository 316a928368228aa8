"""Memory attention in bfloat16 (``tracking_dtype``) and its exact rewrites."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam2_shared.model.memory_attention import MemoryAttention, RoPEAttention

SIDE = 8  # an 8 x 8 token grid keeps the test fast


def _memories(frames: int, pointers: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = frames * SIDE * SIDE + pointers
    return torch.randn(2, tokens, 64), torch.randn(2, tokens, 64)


def test_values_projected_after_the_average_equal_sdpa() -> None:
    """``P (M W^T + b) = (P M) W^T + b``: in float64 the chunked path equals SDPA."""
    torch.manual_seed(0)
    attn = RoPEAttention(256, 1, kv_in_dim=64, rope_k_repeat=True, feat_size=SIDE).double()
    q = torch.randn(2, 1, SIDE * SIDE, 256, dtype=torch.float64)
    k = torch.randn(2, 1, 3 * SIDE * SIDE, 256, dtype=torch.float64)
    memory = torch.randn(2, 3 * SIDE * SIDE, 64, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, attn._split_heads(attn.v_proj(memory)))
    torch.testing.assert_close(attn._attend_low_precision(q, k, memory), expected,
                               rtol=1e-12, atol=1e-12)


def test_bfloat16_copy_stays_close_and_leaves_the_float32_module_alone() -> None:
    torch.manual_seed(0)
    exact = MemoryAttention(256, 2, dim_feedforward=512, num_heads=1, kv_in_dim=64,
                            feat_size=SIDE).eval()
    before = {name: value.clone() for name, value in exact.state_dict().items()}
    low = exact.in_precision(torch.bfloat16)
    assert low.layers[0].cross_attn_image.q_proj.weight.dtype == torch.bfloat16
    assert low.layers[0].norm1.weight.dtype == torch.float32
    curr, curr_pos = torch.randn(2, SIDE * SIDE, 256), torch.randn(2, SIDE * SIDE, 256)
    memory, memory_pos = _memories(frames=3, pointers=8)
    with torch.inference_mode():
        expected = exact(curr, curr_pos, memory, memory_pos, 8)
        got = low(curr, curr_pos, memory, memory_pos, 8)
    assert got.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 1e-2
    for name, value in exact.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name


def test_tracker_dtype_is_not_in_the_checkpoint_and_is_checked() -> None:
    from sam2_shared.model.config import get_config
    from sam2_shared.model.tracker import Sam2TrackerPart

    tracker = Sam2TrackerPart(get_config("sam2.1/hiera_tiny"))
    keys = set(tracker.state_dict())
    tracker.set_tracking_dtype(torch.bfloat16)
    assert set(tracker.state_dict()) == keys
    assert all(v.dtype == torch.float32 for v in tracker.state_dict().values())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        tracker.set_tracking_dtype(torch.float16)
