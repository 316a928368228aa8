"""Small building blocks shared by several parts."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ValueT = TypeVar("ValueT")


def _version(tensor: torch.Tensor) -> int:
    """In-place write counter of ``tensor`` (-1 for inference tensors, which have none)."""
    return -1 if tensor.is_inference() else tensor._version


class TensorMemo(Generic[ValueT]):
    """Values derived from a few recent sets of tensors, reused while the same tensor objects
    come back unmodified: per-image work of the decoder that a run of prompts on one image
    would otherwise redo. Keyed by identity (the sources are held, so an id cannot be reused)
    and in-place write counters; inference-mode tensors have none, and nothing in the model
    writes into its inputs. Holds at most ``size`` entries, the most recently used.
    """

    def __init__(self, size: int) -> None:
        """
        Arguments:
          size (int): most entries kept (sets of source tensors with their values).
        """
        self.size = size
        self._entries: list[tuple[tuple[torch.Tensor, ...], tuple[int, ...], ValueT]] = []

    def get(self, sources: tuple[torch.Tensor, ...], make: Callable[[], ValueT]) -> ValueT:
        """The value remembered for ``sources``, else ``make()`` (then remembered)."""
        versions = tuple(_version(t) for t in sources)
        entries = list(self._entries)  # another thread may replace the list meanwhile
        for index, entry in enumerate(entries):
            held, seen, value = entry
            if seen == versions and all(a is b for a, b in zip(held, sources, strict=True)):
                self._entries = [*entries[:index], *entries[index + 1 :], entry]
                return value
        value = make()
        self._entries = [*entries[max(0, len(entries) + 1 - self.size) :],
                         (sources, versions, value)]
        return value

    def __len__(self) -> int:
        return len(self._entries)


# glibc serves every allocation above 32 MiB with a fresh mmap (its largest mmap
# threshold), whose pages the kernel faults in and zeroes on first touch.
_FRESH_MAPPING_BYTES = 32 << 20


class ScratchBuffers:
    """Per-thread buffers reused from one forward to the next, for the large per-prompt maps
    of a batched CPU forward that would otherwise be allocated and freed every time.

    A [16, 4096, 256] float32 map is 64 MiB: as a fresh mmap it costs 16,384 page faults and
    the kernel zeroing it on every forward (sys time was ~9 % of a 16-prompt decoder forward
    on a 2-core CPU). A buffer handed out here is the same memory as the previous one of its
    ``name`` on this thread: the caller must be done with that one before asking again.
    Smaller requests (the allocator reuses their memory anyway), other devices (their
    allocators cache), autograd and ``torch.compile`` get a plain new tensor.
    """

    def __init__(self, max_bytes: int) -> None:
        """
        Arguments:
          max_bytes (int): most bytes kept per thread; a request that would go beyond it
            gets a plain new tensor.
        """
        self.max_bytes = max_bytes
        self._local = threading.local()

    def empty(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device; this
        thread's buffer ``name`` where it qualifies (see the class docstring)."""
        numel = math.prod(shape)
        nbytes = numel * like.element_size()
        if (nbytes < _FRESH_MAPPING_BYTES or like.device.type != "cpu"
                or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return like.new_empty(shape)
        slots: dict[tuple, torch.Tensor] = self._local.__dict__.setdefault("slots", {})
        # Inference tensors cannot be written outside inference mode: one buffer per mode.
        key = (name, like.dtype, torch.is_inference_mode_enabled())
        buffer = slots.get(key)
        if buffer is None or buffer.numel() < numel:
            others = self.kept_bytes() - (0 if buffer is None else buffer.nbytes)
            if others + nbytes > self.max_bytes:
                # Too large to keep: a plain tensor, and the buffer kept so far stays for
                # the usual sizes (one odd batch must not cost them their buffers).
                return like.new_empty(shape)
            slots.pop(key, None)  # freed before its replacement is made
            buffer = slots[key] = like.new_empty(numel)
        return buffer[:numel].view(shape)

    def __reduce__(self) -> tuple[type, tuple[int]]:
        """Copies and pickles start empty: the buffers are a cache of this process's
        threads, not state."""
        return ScratchBuffers, (self.max_bytes,)

    def kept_bytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(kept.nbytes for kept in self._local.__dict__.get("slots", {}).values())


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a [B, C, H, W] map (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        """
        Arguments:
          num_channels (int): channels C of the [B, C, H, W] input map, the size of
            the learned per-channel weight and bias.
          eps (float): value added to the variance for numerical stability.
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel over channels-last instead of eight elementwise passes;
        # same biased-variance formula as Meta's hand-written version.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with an activation between them.

    The weights live in ``layers.{i}`` as in Meta's checkpoints.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        """
        Arguments:
          input_dim (int): channels of the input features (last dimension).
          hidden_dim (int): width of every hidden layer.
          output_dim (int): channels of the output features.
          num_layers (int): number of Linear layers (num_layers - 1 hidden layers).
          activation (type[nn.Module]): activation class, instantiated once and applied
            after every Linear layer but the last.
          sigmoid_output (bool): apply a sigmoid to the output.
        """
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
