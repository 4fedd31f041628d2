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

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch

from vltrain.data.encode import IGNORE_INDEX
from vltrain.families import family_spec, get_module


def dummy_vision_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of one image of 2x2 patches (one merged token) for this model."""
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    in_channels = getattr(vc, "in_channels", getattr(vc, "in_chans", 3))
    dim = in_channels * vc.temporal_patch_size * vc.patch_size**2
    visual = get_module(model, family_spec(model).vision_module)
    param = next(visual.parameters())
    pixels = torch.zeros(merge * merge, dim, dtype=param.dtype, device=param.device)
    return pixels, device_constant(((1, merge, merge),), torch.long, param.device)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, copied there once: on CUDA a copy from pageable host memory makes the
    host wait for the GPU, and the dummy media are built for every micro-batch that lacks a modality. Do not
    modify the returned tensor in place (it is shared)."""
    return torch.tensor(values, dtype=dtype, device=device)


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
        col[0] = device_constant(tuple(row0), t.dtype, t.device)
        return torch.cat([t, col], dim=1)

    out["input_ids"] = grow(ids, 0, dummy.token_ids)
    if batch.get("labels") is not None:  # unlabelled batches (classification) have none
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


# ------------------------------------------------------------------------- one vision pass per unique medium
_FEATURE_METHODS = {"image": ("get_image_features", "image_source"), "video": ("get_video_features", "video_source")}


def vision_frozen(model) -> bool:
    """True when nothing in the vision tower (merger included) trains -- no parameter, no adapter -- so its
    features are the same for the policy and a reference built from it, at every step."""
    unwrapped = getattr(model, "module", model)
    visual = get_module(unwrapped, family_spec(unwrapped).vision_module)
    return not any(p.requires_grad for p in visual.parameters())


def _expanded(output, source: list[int]):
    """`output` of get_*_features on the unique media, re-indexed per occurrence (pooler_output and, for
    Qwen3.x, the DeepStack features are tuples with one tensor per medium)."""
    picked = type(output)(**dict(output.items()))
    picked.pooler_output = tuple(output.pooler_output[i] for i in source)
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack is not None:
        picked.deepstack_features = [tuple(level[i] for i in source) for level in deepstack]
    return picked


@contextlib.contextmanager
def shared_media(model, batch: dict, features: dict | None = None):
    """While active, the model's forward runs its vision tower once per UNIQUE image / video of `batch`.

    Preference batches (vltrain.data.pairs.PairCollator) hold every medium once (`pixel_values`,
    `pixel_values_videos`) but one grid per occurrence in the tokens (`image_grid_thw`, ...: a pair's
    chosen and rejected sequences each show the prompt's images), with `image_source` / `video_source`
    (num occurrences,) mapping every occurrence to its unique medium. The model's own
    `get_image_features` / `get_video_features` (instance-patched for the duration: they run inside the
    model's forward, where ZeRO-3 and FSDP2 gather the vision weights) run the tower on the unique media
    and hand back per-occurrence features. A batch without the source keys passes through unchanged.

    `features`: a dict to cache the unique features in; when it already holds them (a first forward of
    the same batch filled it) the tower does not run at all. Only valid when the two forwards have the
    same vision tower weights: a reference and a policy whose tower is frozen (`vision_frozen`).
    """
    unwrapped = getattr(model, "module", model)
    inner = get_module(unwrapped, family_spec(unwrapped).vision_module.rpartition(".")[0])
    nested = {"active": False}  # Qwen3.x get_video_features calls get_image_features itself
    previous = {}

    def wrap(kind: str, original, source_key: str):
        source = batch.get(source_key)
        source = None if source is None else [int(i) for i in source.tolist()]
        unique_rows = None
        if source is not None:
            first: dict[int, int] = {}
            for position, index in enumerate(source):
                first.setdefault(index, position)
            assert sorted(first) == list(range(len(first))), f"{source_key} must index media 0..n-1"
            unique_rows = torch.tensor([first[i] for i in range(len(first))])

        signature = inspect.signature(original)
        pixel_name, grid_name = list(signature.parameters)[:2]  # (pixel_values[_videos], image/video_grid_thw)

        # Same signature as the original (functools.wraps): transformers' generate reads it to decide which
        # keyword arguments to hand over when it runs the encoders before the first forward.
        @functools.wraps(original)
        def patched(*args, **kwargs):
            if nested["active"]:
                return original(*args, **kwargs)
            if features is not None and kind in features:
                output = features[kind]
            else:
                bound = signature.bind_partial(*args, **kwargs)
                arguments = dict(bound.arguments)
                extra = arguments.pop("kwargs", {})
                if unique_rows is not None:
                    grid = arguments[grid_name]
                    arguments[grid_name] = grid[unique_rows.to(grid.device)]
                nested["active"] = True
                try:
                    output = original(**arguments, **extra)
                finally:
                    nested["active"] = False
                if features is not None:
                    features[kind] = output
            return output if source is None else _expanded(output, source)

        return patched

    for kind, (method, source_key) in _FEATURE_METHODS.items():
        previous[method] = inner.__dict__.get(method)
        setattr(inner, method, wrap(kind, getattr(inner, method), source_key))
    try:
        yield
    finally:
        for method, value in previous.items():
            if value is None:
                delattr(inner, method)
            else:
                setattr(inner, method, value)
