"""Conv3d patch embedding as the equivalent Linear.

Patches, on one model instance, the vision tower's `patch_embed.proj`: the Conv3d (kernel == stride ==
one whole patch, so each output is a dot product with one flattened patch) is swapped for
`PatchLinear`, which holds the *same* Parameter objects under the same names and computes
`F.linear(patches, weight.view(out, -1), bias)`. State-dict keys and shapes are unchanged, so
checkpoints and `save_pretrained` exports stay loadable by plain transformers, and the parameters an
optimizer already holds stay the ones trained. The stock `patch_embed.forward` still runs around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchLinear(nn.Module):
    """A stride==kernel Conv3d computed as a Linear over flattened patches; input (N, C, T, P, P)."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0, 0), "valid"):
            raise ValueError(f"patch_embed_linear needs a stride==kernel, unpadded Conv3d, got {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.in_features = conv.in_channels * math.prod(conv.kernel_size)
        self.out_features = conv.out_channels

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(self.out_features, self.in_features)
        return F.linear(patches.reshape(-1, self.in_features), weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def patch_patch_embed_linear(patch_embed: nn.Module, path: str) -> list[str]:
    """Swap `patch_embed.proj` (a Conv3d) for `PatchLinear` on this instance; [] if already swapped."""
    if isinstance(patch_embed.proj, PatchLinear):
        return []
    if not isinstance(patch_embed.proj, nn.Conv3d):
        raise ValueError(f"patch_embed_linear expects {path}.proj to be a Conv3d, got {type(patch_embed.proj)}")
    patch_embed.proj = PatchLinear(patch_embed.proj)
    return [f"patch_embed_linear: {path}.proj Conv3d -> Linear"]
