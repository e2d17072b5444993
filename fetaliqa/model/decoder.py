"""FetalCLIP-SEG decoder: UNETR-style, every convolution depthwise-separable.

Exactly the published geometry (see shared spec): with f the base width and W the encoder
width, 1,591,941 parameters for FetalCLIP (W=1024, f=32). Inputs are the four tapped
feature maps (shallow -> deep, each (B, W, g, g) with g = image_size / 16) and the
normalised image z0 (B, 3, image_size, image_size); output one logit channel at full size.
In every concatenation the shallower branch comes first.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, i, 3, padding=1, groups=i), nn.BatchNorm2d(i), nn.ReLU(inplace=True),
                         nn.Conv2d(i, o, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


def deconv_block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(i, i, 2, stride=2, groups=i),
                         nn.Conv2d(i, i, 3, padding=1, groups=i), nn.BatchNorm2d(i), nn.ReLU(inplace=True),
                         nn.Conv2d(i, o, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


def up_block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(i, i, 2, stride=2, groups=i), nn.Conv2d(i, o, 1))


class SegDecoder(nn.Module):
    def __init__(self, width: int, f: int = 32) -> None:
        super().__init__()
        W = width
        self.up_deep = up_block(W, 8 * f)                                    # z24 -> a (g*2)
        self.deconv_mid = deconv_block(W, 8 * f)                             # z12 -> b (g*2)
        self.c = nn.Sequential(conv_block(16 * f, 8 * f), conv_block(8 * f, 8 * f),
                               conv_block(8 * f, 8 * f), up_block(8 * f, 4 * f))        # (g*4)
        self.d = nn.Sequential(deconv_block(W, 8 * f), deconv_block(8 * f, 4 * f))       # z8 (g*4)
        self.e = nn.Sequential(conv_block(8 * f, 4 * f), conv_block(4 * f, 4 * f), up_block(4 * f, 2 * f))
        self.g = nn.Sequential(deconv_block(W, 8 * f), deconv_block(8 * f, 4 * f), deconv_block(4 * f, 2 * f))
        self.h = nn.Sequential(conv_block(4 * f, 2 * f), conv_block(2 * f, 2 * f), up_block(2 * f, f))
        self.k = nn.Sequential(conv_block(3, f), conv_block(f, f))
        self.out = nn.Sequential(conv_block(2 * f, f), conv_block(f, f), nn.Conv2d(f, 1, 1))

    def forward(self, feats: list[torch.Tensor], z0: torch.Tensor) -> torch.Tensor:
        z6, z8, z12, z24 = feats
        a = self.up_deep(z24)
        b = self.deconv_mid(z12)
        c = self.c(torch.cat([b, a], 1))
        e = self.e(torch.cat([self.d(z8), c], 1))
        h = self.h(torch.cat([self.g(z6), e], 1))
        return self.out(torch.cat([self.k(z0), h], 1))
