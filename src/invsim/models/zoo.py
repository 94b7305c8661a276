"""Small built-in architectures for 28x28x1 and 32x32x3 inputs (CPU-scale zoo).

They stand in for the paper's nine ImageNet architectures: an MLP, LeNet, VGG (with BN),
a CIFAR-style ResNet-18, DenseNet, MobileNetV2 and a tiny ViT. Every activation is its
own ``nn.ReLU``/``nn.GELU`` module (none reused), so the last ReLU before the
classifier can be found and, for the robustness library's ``fake_relu``, bypassed.
Every model ends in one ``nn.Linear`` classifier whose input is the representation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from invsim.catalog import BUILTIN

__all__ = ["ARCHITECTURES", "build"]


def _mlp(num_classes: int, in_channels: int, image_size: int, width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, width),
        nn.ReLU(),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Linear(width // 2, num_classes),
    )


def _lenet(num_classes: int, in_channels: int, image_size: int, width: int = 6) -> nn.Module:
    s = ((image_size // 2) - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * s * s, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class VGG(nn.Module):
    """VGG-style: 3x3 conv + BN + ReLU stages, global pooling, a hidden FC layer."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in (width, "M", 2 * width, "M", 4 * width, 4 * width, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool); ``width`` is the first stage's width
    (64 in the original)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    """Small DenseNet-BC: three dense blocks with transitions."""

    def __init__(
        self, num_classes: int, in_channels: int, image_size: int, width: int = 8, depth: int = 3
    ):
        super().__init__()
        growth = width
        c = 2 * growth
        # a 3x3 stem then 2x2 pooling: the dense blocks run at 1/2, 1/4 and 1/8 resolution
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
            nn.AvgPool2d(2),
        ]
        for block in range(3):
            for _ in range(depth):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if block < 2:
                out = c // 2
                layers += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                    nn.Conv2d(c, out, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                c = out
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Small MobileNetV2: inverted residual blocks, a 1x1 head conv, global pooling."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 16):
        super().__init__()
        w = width
        cfg = [(1, w, 1, 1), (6, int(1.5 * w), 2, 2), (6, 2 * w, 2, 2), (6, 4 * w, 1, 1)]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, w, 3, 2, 1, bias=False),  # stride 2, as in MobileNetV2
            nn.BatchNorm2d(w),
            nn.ReLU6(),
        ]
        c = w
        for expand, cout, n, stride in cfg:
            for i in range(n):
                layers.append(_InvertedResidual(c, cout, stride if i == 0 else 1, expand))
                c = cout
        head = 16 * w
        layers += [
            nn.Conv2d(c, head, 1, bias=False),
            nn.BatchNorm2d(head),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Tiny Vision Transformer: 4x4 patches, class token, pre-norm blocks, final LayerNorm."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch {patch}.")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[_Block(width, heads, 2 * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# name -> builder, from the one list of built-in names (invsim.catalog.BUILTIN)
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    name: globals()[target.split(":")[1]] for name, target in BUILTIN.items()
}


def build(
    name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs
) -> nn.Module:
    """Build a built-in architecture (untrained). ``kwargs`` such as ``width`` pass through."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown built-in architecture {name!r}; known: {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[name](num_classes, in_channels, image_size, **kwargs)
