"""Every rank runs the vision tower the same way every step.

Under ZeRO-3 (parameters gathered module by module, collectively, and the module order checked across
ranks on the first step) and DDP / ZeRO-2 (gradients reduced for every parameter, in bucket order),
a rank whose batch lacks images or videos would run a different sequence of modules than the others,
and the job hangs or errors. `complete_modalities` therefore appends a dummy image and/or a dummy video
(one merged token of zero pixels each) to the end of row 0 of a batch that lacks them: the model then
runs its own image and video paths, in the same place and order, on every rank. The appended tokens
are labelled -100 and come last, so causal attention leaves every real token's output and the loss
unchanged; `link_dummy_features` adds their embeddings times zero to the language model's input, so
every vision parameter is in the backward graph too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vltrain.data.encode import IGNORE_INDEX
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


def batch_has_media(batch: dict) -> bool:
    return batch.get("pixel_values") is not None or batch.get("pixel_values_videos") is not None


@dataclass
class DummyMedia:
    """A dummy image and/or video (one merged token of zero pixels each) for the modalities a batch lacks."""

    token_ids: list[int]  # the media placeholder token of each, in the order appended
    type_ids: list[int]  # their mm_token_type_ids (1 image, 2 video)
    tensors: dict[str, torch.Tensor]  # pixel_values / image_grid_thw and/or pixel_values_videos / video_grid_thw


def missing_media(model, batch: dict) -> DummyMedia | None:
    """The dummy media `batch` needs so that the model runs both its image and its video path (None: none)."""
    need = [kind for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos"))
            if batch.get(key) is None]
    if not need:
        return None
    config = model.config
    pixels, grid = dummy_vision_inputs(model)
    tensors = {}
    for kind in need:
        pixel_key, grid_key = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
        tensors[pixel_key], tensors[grid_key] = pixels, grid
    return DummyMedia(token_ids=[config.image_token_id if k == "image" else config.video_token_id for k in need],
                      type_ids=[1 if k == "image" else 2 for k in need], tensors=tensors)


def complete_modalities(model, batch: dict) -> tuple[dict, bool]:
    """(batch with a dummy image and/or video appended where it has none, whether anything was added).

    Works for padded (B, L) batches (the model computes position ids) and packed rows with position_ids
    (4, B, L): the appended tokens get text position 0, so the packed attention sees them as an example
    of their own, and mRoPE ids 0, which is what the model computes for a lone one-token image."""
    dummy = missing_media(model, batch)
    if dummy is None:
        return batch, False
    out = dict(batch)
    ids = batch["input_ids"]
    rows, n = ids.shape[0], len(dummy.token_ids)

    def grow(t, fill, row0):
        col = torch.full((rows, n), fill, dtype=t.dtype, device=t.device)
        col[0] = torch.tensor(row0, dtype=t.dtype, device=t.device)
        return torch.cat([t, col], dim=1)

    out["input_ids"] = grow(ids, 0, dummy.token_ids)
    out["labels"] = grow(batch["labels"], IGNORE_INDEX, [IGNORE_INDEX] * n)
    out["mm_token_type_ids"] = grow(batch["mm_token_type_ids"], 0, dummy.type_ids)
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = grow(batch["attention_mask"], 0, [1] * n)
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        out["position_ids"] = torch.cat([pos, pos.new_zeros(*pos.shape[:-1], n)], dim=-1)
    return out | dummy.tensors, True


def link_dummy_features(model):
    """Context manager: while active, the language model's input embeddings (and DeepStack features)
    get `0 * their sum` added, so the dummy media tokens' features reach the loss with weight zero."""
    language_model = get_module(model, family_spec(model).llm_module)

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        zero = embeds.sum()
        for t in kwargs.get("deepstack_visual_embeds") or []:
            zero = zero + t.sum()
        kwargs["inputs_embeds"] = embeds + (zero * 0.0).to(embeds.dtype)
        return args, kwargs

    return _RemovableHook(language_model.register_forward_pre_hook(hook, with_kwargs=True))


class _RemovableHook:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
