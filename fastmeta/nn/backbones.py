"""Feature extractors of the few-shot literature."""

from typing import Sequence

import torch
from torch import nn

__all__ = ["Conv4", "ResNet12", "ChannelsLastConv2d"]


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes in the ``channels_last`` layout on the CPU.

    oneDNN's channels-last convolutions are faster than its NCHW ones at the
    sizes of few-shot backbones (Conv4 forward + backward: 1.26x-1.45x on
    28x28x1 and 84x84x3 episodes; ResNet-12 up to 1.09x; docs/benchmarks.md).
    The weight is laid out channels-last for the call (a copy of the weight,
    and of its gradient back); the parameter, its gradient and the state dict
    keep PyTorch's default layout, and ``torch.func.functional_call`` with
    other weights (MAML's adapted ones) takes the same path. The output is
    channels-last; the backbones return their features in the default layout.
    On CUDA the layout is left to PyTorch.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if input.device.type == "cpu":
            weight = weight.to(memory_format=torch.channels_last)
        return super()._conv_forward(input, weight, bias)


def conv_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU and (optionally) 2x2 max-pooling."""
    layers = [ChannelsLastConv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Conv4(nn.Sequential):
    """The four-block convolutional backbone of Vinyals et al. (2016) and Snell
    et al. (2017): each block a 3x3 convolution of ``hidden_channels``
    filters, batch norm, ReLU and 2x2 max-pooling; the output flattened.

    28x28x1 images give 64 features, 84x84x3 give 1600. Relation networks
    (Sung et al. 2018) keep feature maps and pool only in the first two
    blocks: ``Conv4(1, pooled_blocks=2, flatten=False)`` maps 28x28x1 to
    ``[64, 7, 7]``.

    Args:
        in_channels: image channels.
        hidden_channels: filters per block (64 in the papers).
        pooled_blocks: how many blocks, from the first, end in max-pooling.
        flatten: return ``[n, features]`` (else feature maps ``[n, C, h, w]``).

    Example:
        >>> Conv4(1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 1, hidden_channels: int = 64, pooled_blocks: int = 4, flatten: bool = True):
        if not 0 <= pooled_blocks <= 4:
            raise ValueError(f"Conv4: pooled_blocks must be in 0..4, got {pooled_blocks}")
        blocks = [
            conv_block(in_channels if i == 0 else hidden_channels, hidden_channels, i < pooled_blocks) for i in range(4)
        ]
        super().__init__(*blocks, *([nn.Flatten()] if flatten else []))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).contiguous()

    def __getitem__(self, index):
        if isinstance(index, slice):  # a slice is a plain nn.Sequential of those blocks
            return nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)


class ResidualBlock(nn.Module):
    """ResNet-12's block: three 3x3 convolutions with batch norm and leaky
    ReLU, a 1x1 convolution on the shortcut, then 2x2 max-pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ChannelsLastConv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            ChannelsLastConv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            ChannelsLastConv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            ChannelsLastConv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """The ResNet-12 backbone of modern few-shot learning (Oreshkin et al.
    2018, Lee et al. 2019): four residual blocks of ``channels`` (64, 160,
    320, 640), each halving the resolution, then global average pooling:
    ``channels[-1]`` features per image (without DropBlock).

    Example:
        >>> ResNet12(3)(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 640])
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640), flatten: bool = True):
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.blocks(x)
        return maps.mean((2, 3)) if self.flatten else maps.contiguous()
