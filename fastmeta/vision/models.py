"""learn2learn's vision models (``l2l.vision.models``) with its constructor
arguments, parameter names (so its state dicts load) and initialisation:
each is ``features`` (a backbone) then a linear ``classifier``. The
convolutions compute channels-last on the CPU
(:class:`~fastmeta.nn.ChannelsLastConv2d`, same parameters)."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.backbones import ChannelsLastConv2d
from ..nn.layers import Lambda

__all__ = [
    "OmniglotFC",
    "OmniglotCNN",
    "CNN4Backbone",
    "CNN4",
    "MiniImagenetCNN",
    "ResNet12Backbone",
    "ResNet12",
    "WRN28Backbone",
    "WRN28",
    "fc_init_",
    "maml_init_",
]


def fc_init_(module: nn.Module) -> nn.Module:
    """Weight from a normal of std 0.01 truncated at two std, bias 0."""
    nn.init.trunc_normal_(module.weight, std=0.01, a=-0.02, b=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weight, bias 0 (Finn et al.'s initialisation)."""
    nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class LinearBlock(nn.Module):
    """Linear, batch norm (batch statistics only), ReLU."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(output_size, momentum=0.999, eps=1e-3, track_running_stats=False)
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x):
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU, then max-pooling (or, without
    ``max_pool``, a strided convolution)."""

    def __init__(self, in_channels, out_channels, kernel_size, max_pool: bool = True, max_pool_factor: float = 1.0):
        super().__init__()
        stride = int(2 * max_pool_factor)
        self.max_pool = nn.MaxPool2d(stride, stride) if max_pool else nn.Identity()
        self.normalize = nn.BatchNorm2d(out_channels)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        conv_stride = 1 if max_pool else stride
        self.conv = maml_init_(ChannelsLastConv2d(in_channels, out_channels, kernel_size, conv_stride, padding=1))

    def forward(self, x):
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    def __init__(self, hidden=64, channels=1, max_pool=False, layers=4, max_pool_factor=1.0):
        blocks = [
            ConvBlock(channels if i == 0 else hidden, hidden, 3, max_pool, max_pool_factor) for i in range(layers)
        ]
        super().__init__(*blocks)


class OmniglotFC(nn.Module):
    """Santoro et al.'s fully connected Omniglot network: ``sizes``
    (default 256-128-64-64) linear blocks on the flattened image."""

    def __init__(self, input_size: int, output_size: int, sizes: Optional[Sequence[int]] = None):
        super().__init__()
        sizes = list(sizes or [256, 128, 64, 64])
        blocks = [LinearBlock(i, o) for i, o in zip([input_size] + sizes[:-1], sizes)]
        self.features = nn.Sequential(nn.Flatten(), nn.Sequential(*blocks))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x):
        return self.classifier(self.features(x))


class OmniglotCNN(nn.Module):
    """Finn et al.'s Omniglot network: ``layers`` strided conv blocks of
    ``hidden_size`` channels on 28x28x1 images, averaged over positions."""

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            Lambda(lambda x: x.view(-1, 1, 28, 28)), self.base, Lambda(lambda x: x.mean(dim=[2, 3])), nn.Flatten()
        )
        self.classifier = nn.Linear(hidden_size, output_size)
        nn.init.normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """``layers`` conv blocks of ``hidden_size`` channels with max-pooling,
    flattened (1600 features for 84x84x3 images and 64 channels)."""

    def __init__(self, hidden_size=64, layers=4, channels=3, max_pool=True, max_pool_factor=None):
        factor = 4 // layers if max_pool_factor is None else max_pool_factor
        super().__init__(
            hidden=hidden_size, layers=layers, channels=channels, max_pool=max_pool, max_pool_factor=factor
        )

    def forward(self, x):
        return super().forward(x).reshape(x.shape[0], -1)


class CNN4(nn.Module):
    """The four-block convolutional network of MAML's mini-ImageNet
    experiments (``MiniImagenetCNN``): :class:`CNN4Backbone` and a linear
    classifier from ``embedding_size`` (default ``25 * hidden_size``) features."""

    def __init__(self, output_size, hidden_size=64, layers=4, channels=3, max_pool=True, embedding_size=None):
        super().__init__()
        self.features = CNN4Backbone(hidden_size, layers, channels, max_pool, max_pool_factor=4 // layers)
        self.classifier = maml_init_(nn.Linear(embedding_size or 25 * hidden_size, output_size))
        self.hidden_size = hidden_size

    def forward(self, x):
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) in training: each position whose
    ``block_size`` x ``block_size`` block fits in the map seeds a dropped
    block with probability ``gamma``; the kept values are rescaled by the
    fraction kept."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        if not self.training:
            return x
        b = self.block_size
        B, C, H, W = x.shape
        seeds = torch.bernoulli(torch.full((B, C, H - b + 1, W - b + 1), gamma, device=x.device, dtype=x.dtype))
        keep = self.keep_mask(seeds)
        return keep * x * (keep.numel() / keep.sum())

    def keep_mask(self, seeds: torch.Tensor) -> torch.Tensor:
        """0 where a block covers the position, else 1: a seed at ``(i, j)``
        covers rows ``i .. i+b-1`` and columns ``j .. j+b-1``."""
        b = self.block_size
        return 1 - F.max_pool2d(F.pad(seeds, (b - 1,) * 4), b, stride=1)


class BasicBlock(nn.Module):
    """ResNet-12's residual block: three 3x3 conv-BN (leaky ReLU 0.1
    between), a 1x1 conv-BN shortcut, leaky ReLU, max-pooling by ``stride``,
    then dropout or DropBlock (its rate ramped up over the first 40,000 calls)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_rate=0.0, drop_block=False, block_size=1):
        super().__init__()
        self.conv1 = ChannelsLastConv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = ChannelsLastConv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = ChannelsLastConv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(stride)
        self.downsample = downsample
        self.stride, self.drop_rate, self.drop_block, self.block_size = stride, drop_rate, drop_block, block_size
        self.num_batches_tracked = 0
        self.DropBlock = DropBlock(block_size)

    def forward(self, x):
        self.num_batches_tracked += 1
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + (x if self.downsample is None else self.downsample(x))))
        if self.drop_rate > 0:
            if self.drop_block:
                size = out.shape[2]
                keep_rate = max(1.0 - self.drop_rate / 40000 * self.num_batches_tracked, 1.0 - self.drop_rate)
                gamma = (1 - keep_rate) / self.block_size**2 * size**2 / (size - self.block_size + 1) ** 2
                out = self.DropBlock(out, gamma)
            else:
                out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class ResNet12Backbone(nn.Module):
    """ResNet-12 (MetaOptNet's, ``wider``: 64-160-320-640 channels; else
    TADAM's 64-128-256-512), DropBlock in the last two stages, average
    pooling over the 5x5 map of 84x84 images (``avg_pool=False``: the
    flattened map)."""

    def __init__(
        self, avg_pool=True, wider=True, embedding_dropout=0.0, dropblock_dropout=0.1, dropblock_size=5, channels=3
    ):
        super().__init__()
        widths = [64, 160, 320, 640] if wider else [64, 128, 256, 512]
        inplanes, stages = channels, []
        for stage, planes in enumerate(widths):
            downsample = nn.Sequential(ChannelsLastConv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
            late = stage >= 2
            block = BasicBlock(
                inplanes,
                planes,
                2,
                downsample,
                dropblock_dropout,
                drop_block=late,
                block_size=dropblock_size if late else 1,
            )
            stages.append(nn.Sequential(block))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AvgPool2d(5, stride=1) if avg_pool else nn.Identity()
        self.flatten = nn.Flatten()
        self.embedding_dropout, self.keep_avg_pool, self.dropblock_dropout = (
            embedding_dropout,
            avg_pool,
            dropblock_dropout,
        )
        self.dropout = nn.Dropout(p=embedding_dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.flatten(self.avgpool(x)))


class ResNet12(nn.Module):
    """:class:`ResNet12Backbone` and a linear classifier from ``hidden_size`` features."""

    def __init__(
        self,
        output_size,
        hidden_size=640,
        avg_pool=True,
        wider=True,
        embedding_dropout=0.0,
        dropblock_dropout=0.1,
        dropblock_size=5,
        channels=3,
    ):
        super().__init__()
        self.features = ResNet12Backbone(
            avg_pool, wider, embedding_dropout, dropblock_dropout, dropblock_size, channels
        )
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.classifier(self.features(x))


class WideBasic(nn.Module):
    """A pre-activation wide residual block: BN, ReLU, 3x3 conv, dropout,
    BN, ReLU, 3x3 conv (strided), plus the (1x1 conv) shortcut."""

    def __init__(self, in_planes, planes, dropout_rate, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = ChannelsLastConv2d(in_planes, planes, 3, padding=1)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = ChannelsLastConv2d(planes, planes, 3, stride=stride, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(ChannelsLastConv2d(in_planes, planes, 1, stride=stride))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        return self.conv2(F.relu(self.bn2(out))) + self.shortcut(x)


class WRN28Backbone(nn.Module):
    """WRN-28-10 (Zagoruyko & Komodakis): three stages of four wide blocks
    (160, 320, 640 channels), BN and ReLU, average-pooled over the 21x21
    map of 84x84 images: 640 features."""

    def __init__(self, dropout: float = 0.0, depth: int = 28, widen_factor: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN28Backbone: the depth of a wide ResNet is 6n + 4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = ChannelsLastConv2d(3, widths[0], 3, padding=1)
        in_planes, stages = widths[0], []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(in_planes, planes, dropout, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.avg_pool2d(F.relu(self.bn1(out)), 21).flatten(1)


class WRN28(nn.Module):
    """:class:`WRN28Backbone` and a linear classifier from ``hidden_size`` features."""

    def __init__(self, output_size, hidden_size=640, dropout=0.0):
        super().__init__()
        self.features = WRN28Backbone(dropout=dropout)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.classifier(self.features(x))
