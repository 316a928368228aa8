"""One tracked object's bounded state: its prompts, conditioning frames, the memory window
behind the last tracked frame and a fixed-size ring of object pointers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from sam2_shared.model.tracker import MAX_OBJ_PTRS, FrameOutput


@dataclass
class ObjectState:
    obj_id: int
    num_frames: int
    points: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask_frames: set[int] = field(default_factory=set)
    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    tracked: np.ndarray = field(init=False)  # [T] bool: frame has been tracked
    tracked_reverse: np.ndarray = field(init=False)  # [T] bool: ...and last in reverse
    # Pointers of frames 6..14 behind the last tracked one, in a fixed-size ring (slot =
    # frame mod size; any 15 consecutive frames map to distinct slots), so the state does
    # not grow while the pointer window fills.
    ring_frames: torch.Tensor = field(init=False)  # [R] int32 frame of each slot, -1 empty
    ring_ptrs: torch.Tensor = field(init=False)  # [R, 1, 256]
    ring_scores: torch.Tensor = field(init=False)  # [R, 1, 1]
    device: torch.device = torch.device("cpu")
    dim: int = 256

    def __post_init__(self) -> None:
        self.tracked = np.zeros(self.num_frames, dtype=bool)
        self.tracked_reverse = np.zeros(self.num_frames, dtype=bool)
        slots = MAX_OBJ_PTRS - 1
        self.ring_frames = torch.full((slots,), -1, dtype=torch.int32)
        self.ring_ptrs = torch.zeros((slots, 1, self.dim), device=self.device)
        self.ring_scores = torch.zeros((slots, 1, 1), device=self.device)

    def to_ring(self, frame_idx: int, out: FrameOutput) -> None:
        slot = frame_idx % len(self.ring_frames)
        self.ring_frames[slot] = frame_idx
        self.ring_ptrs[slot] = out.obj_ptr.to(self.ring_ptrs.dtype)
        self.ring_scores[slot] = out.object_score_logits.to(self.ring_scores.dtype)

    def memory_bank(self) -> _NonCondBank:
        return _NonCondBank(self)

    def stores(self) -> dict[str, dict[int, FrameOutput]]:
        return {
            "cond": self.cond,
            "non_cond": self.non_cond,
            "temp_cond": self.temp_cond,
            "temp_non_cond": self.temp_non_cond,
        }

    def lookup(self, frame_idx: int, temp: dict[int, FrameOutput]) -> FrameOutput | None:
        for store in (temp, self.cond, self.non_cond):
            if frame_idx in store:
                return store[frame_idx]
        return None

    def nbytes(self) -> int:
        total = self.tracked.nbytes + self.tracked_reverse.nbytes
        total += sum(tensor_nbytes(t) for t in (self.ring_frames, self.ring_ptrs,
                                                  self.ring_scores))
        for coords, labels in self.points.values():
            total += tensor_nbytes(coords) + tensor_nbytes(labels)
        for store in self.stores().values():
            for out in store.values():
                total += sum(tensor_nbytes(t) for t in output_tensors(out).values())
        return total



class _NonCondBank(Mapping[int, FrameOutput]):
    """An object's non-conditioning outputs: full entries, then pointer-only ring slots."""

    def __init__(self, obj: ObjectState) -> None:
        self._obj = obj

    def __getitem__(self, frame_idx: int) -> FrameOutput:
        obj = self._obj
        if frame_idx in obj.non_cond:
            return obj.non_cond[frame_idx]
        slot = frame_idx % len(obj.ring_frames)
        if frame_idx >= 0 and int(obj.ring_frames[slot]) == frame_idx:
            return FrameOutput(None, None, obj.ring_ptrs[slot], obj.ring_scores[slot])
        raise KeyError(frame_idx)

    def __iter__(self) -> Iterator[int]:
        ring = [int(f) for f in self._obj.ring_frames if f >= 0]
        return iter(list(self._obj.non_cond) + [f for f in ring if f not in self._obj.non_cond])

    def __len__(self) -> int:
        return sum(1 for _ in self)



def tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()



def output_tensors(out: FrameOutput) -> dict[str, torch.Tensor | None]:
    return {
        "maskmem_features": out.maskmem_features,
        "pred_masks": out.pred_masks,
        "obj_ptr": out.obj_ptr,
        "object_score_logits": out.object_score_logits,
    }
