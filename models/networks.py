"""The GDWS paper's networks at CIFAR size (32x32 input): PreActResNet-18, ResNet-18,
VGG-16 and WideResNet-28-4, written plainly so their ONNX exports look like the robust
checkpoints users bring (Conv -> BatchNormalization -> Relu chains, residual Adds).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv twice, identity skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = _projection(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class BasicBlock(nn.Module):
    """Post-activation basic block (ResNet v1): conv-BN-ReLU-conv-BN, projected skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _projection(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Four stages of two blocks (64-128-256-512 channels), global pool, linear head."""

    def __init__(self, block: type, preact: bool, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = None if preact else nn.BatchNorm2d(64)
        stages = []
        width = 64
        for stage_width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [block(width, stage_width, stride), block(stage_width, stage_width, 1)]
            width = stage_width
        self.layers = nn.Sequential(*stages)
        self.bn_final = nn.BatchNorm2d(512) if preact else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = torch.relu(self.bn1(out))
        out = self.layers(out)
        if self.bn_final is not None:
            out = torch.relu(self.bn_final(out))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(PreActBlock, preact=True, num_classes=num_classes, in_channels=in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(BasicBlock, preact=False, num_classes=num_classes, in_channels=in_channels)


VGG16_LAYOUT = (
    *(64, 64, "M", 128, 128, "M"),
    *(256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BatchNorm; five pools bring 32x32 down to 1x1 before the head."""
    layers = []
    width = in_channels
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [
            nn.Conv2d(width, item, 3, padding=1, bias=False),
            nn.BatchNorm2d(item),
            nn.ReLU(),
        ]
        width = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


def wide_resnet(depth: int = 28, widen: int = 4, num_classes: int = 10, in_channels: int = 3):
    """WideResNet-depth-widen: three stages of (depth-4)/6 pre-activation blocks."""
    blocks_per_stage = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    layers = [_conv3x3(in_channels, 16)]
    width = 16
    for stage, stage_width in enumerate(widths):
        for index in range(blocks_per_stage):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(PreActBlock(width, stage_width, stride))
            width = stage_width
    layers += [
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    ]
    return nn.Sequential(*layers)


def wide_resnet28_4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return wide_resnet(28, 4, num_classes, in_channels)


SMALL_VGG_STAGES = ((16,), (32, 32), (64, 64))


def small_vgg(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Five conv-BN-ReLU layers in three stages (32, 16, 8 pixels), global pool, linear head.

    Small enough to PGD-train on 2 CPU cores in minutes (the bundled robust model), with
    the same Conv -> BatchNormalization -> Relu chains as the big networks.
    """
    layers = []
    width = in_channels
    for index, stage in enumerate(SMALL_VGG_STAGES):
        if index > 0:
            layers.append(nn.MaxPool2d(2))
        for out_channels in stage:
            conv = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
            width = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class MultiExitVGG(nn.Module):
    """small_vgg with an early exit after each of its first two stages (RDI-Nets, Hu et al.
    2020): forward returns (exit_0, exit_1, final) logits.

    Each exit head is a stride-2 3x3 conv (as wide as its stage), BN, ReLU, global average
    pool and a linear layer: 0.59 M MACs each, so leaving at exit 0 costs 10 % of the
    single-pass model's 7.2 M MACs, at exit 1 67 %, at final 116 % (every head run). The
    backbone is small_vgg's, layer for layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        stages, heads = [], []
        width = in_channels
        for index, stage in enumerate(SMALL_VGG_STAGES):
            layers = [nn.MaxPool2d(2)] if index > 0 else []
            for out_channels in stage:
                conv = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
                width = out_channels
            stages.append(nn.Sequential(*layers))
            head = [] if index == len(SMALL_VGG_STAGES) - 1 else _exit_head(width)
            heads.append(nn.Sequential(*head, *_classifier(width, num_classes)))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        exits = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            exits.append(head(x))
        return tuple(exits)


def _exit_head(width: int) -> List[nn.Module]:
    conv = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(width), nn.ReLU()]


def _classifier(width: int, num_classes: int) -> List[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]


def multi_exit_vgg(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return MultiExitVGG(num_classes, in_channels)


ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": preact_resnet18,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn28-4": wide_resnet28_4,
}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Fresh BatchNorms are identities in eval mode, which would let a mirror or a rewrite
    that mishandles them pass a parity test; trained ones never are.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()
