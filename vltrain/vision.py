"""The dummy vision pass: every rank runs the vision tower every step.

Under ZeRO-3 (parameters gathered layer by layer, collectively) and DDP (gradients all-reduced for
every parameter), a rank whose batch has no image or video would skip the vision tower while the
others run it, and the job hangs or errors. A text-only batch therefore runs the tower on a tiny
dummy input and adds its output times zero to the loss: same value, every vision parameter in the
graph.
"""

from __future__ import annotations

import torch

from vltrain.families import family_spec, get_module


def dummy_vision_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of one image of 2x2 patches (one merged token) for this model."""
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    grid = torch.tensor([[1, merge, merge]])
    in_channels = getattr(vc, "in_channels", getattr(vc, "in_chans", 3))
    dim = in_channels * vc.temporal_patch_size * vc.patch_size**2
    visual = get_module(model, family_spec(model).vision_module)
    param = next(visual.parameters())
    pixels = torch.zeros(merge * merge, dim, dtype=param.dtype, device=param.device)
    return pixels, grid.to(param.device)


def _float_tensors(obj):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict) or hasattr(obj, "values"):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v)


def dummy_vision_loss(model) -> torch.Tensor:
    """A zero scalar that depends on every vision-tower and merger parameter (DeepStack ones included)."""
    pixels, grid = dummy_vision_inputs(model)
    visual = get_module(model, family_spec(model).vision_module)
    out = visual(pixels, grid_thw=grid)
    return sum(t.float().sum() for t in _float_tensors(out)) * 0.0


def batch_has_media(batch: dict) -> bool:
    return batch.get("pixel_values") is not None or batch.get("pixel_values_videos") is not None
