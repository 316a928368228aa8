"""Small building blocks shared by several parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
