"""The vision features merged into the text embeddings by integer index: no device -> host sync.

Patches, on one model instance, `forward` of the multimodal model (the family's `Qwen*Model`, at
`model.model`) and, where the family has DeepStack (Qwen3-VL and its MoE), `_deepstack_process` of its
language model. The stock forward (transformers 5.24) reads the device on the host for every modality
of every forward, each read stalling the host from queueing the next kernels:
- `get_image_features` / `get_video_features` split the tower's output per image with `.tolist()` of a
  device tensor;
- `get_placeholder_mask` checks the placeholder count against the features by reading a tensor compare;
- `masked_scatter` puts the features in place; its backward (`masked_select`) reads the mask's count;
- DeepStack adds the tower's intermediate features at the placeholders of the first layers by boolean
  indexing: two reads per layer in the forward and one per layer in the backward; with images and
  videos in one batch, the joint mask and its buffer make three more.
The patched `get_image_features` / `get_video_features` split on the host grid list (below); the patched
forward calls them (so a wrapper of them, `vltrain.vision.shared_media`, still applies), finds each modality's placeholder positions once, as integer indices over the
flattened (B * L) tokens -- `torch.nonzero_static` sized by the tower output's row count, a shape the
host knows -- puts the features in with `index_copy` and hands DeepStack the concatenated indices and
features, which the patched `_deepstack_process` adds with `index_add`; both backwards are
`index_select` / `index_fill`, sync-free. The same values as stock, in the same order. The count check
stays, as `torch._assert_async` (on CPU it raises at once with the message; on CUDA it is a device-side
assert, raised at the next sync). The per-medium split of the features (`image_outputs.pooler_output`, the
DeepStack features) uses the grid list that `vision_positions` reads for the tower (shared cache: no
second read; without `vision_positions` it is one read per modality, as stock).

A batch with both images and videos runs the tower ONCE, over the images followed by the videos
(`_media_features`; the tower attends within each medium, so the features are those of two calls): every
training micro-batch holds both (`vltrain.vision.complete_modalities` adds a one-token dummy for a missing
one), so the stock forward's second tower pass -- all its blocks' kernels launched for one token -- is gone.
Two calls remain where a wrapper of get_*_features must see each modality (`shared_media`) or a caller passes
modality-prefixed precomputed kwargs.

Everything else is the stock forward: the embedding, the tower call (with the forward's kwargs), the
mRoPE position ids when none are given (`compute_3d_position_ids`), the language model call and the
family's own output class. A call without media, with `inputs_embeds`, `mm_encoder_outputs`, a KV cache
(generation) or `return_dict=False` runs the stock forward unchanged.

Before patching, the class forward's parameters are checked against the ones this was written for
(transformers 5.24); a class whose forward changed is refused with a ValueError naming the model_type.
"""

from __future__ import annotations

import importlib
import inspect
import types

import torch
from transformers.utils import generic
from transformers.utils.generic import accepts_precomputed_kwargs, can_return_tuple

from vltrain.families import family_spec, get_module
from vltrain.kernels.vision_positions import concat_grids, host_grids

# model_type -> (multimodal model class, output class); the output class lives in the family module,
# "" = transformers.modeling_outputs.MultimodalBaseModelOutputWithPast
MERGED_MODELS = {
    "qwen2_vl": ("Qwen2VLModel", ""),
    "qwen2_5_vl": ("Qwen2_5_VLModel", ""),
    "qwen3_vl": ("Qwen3VLModel", ""),
    "qwen3_vl_moe": ("Qwen3VLMoeModel", "Qwen3VLMoeBaseModelOutputWithPast"),
    "qwen3_5": ("Qwen3_5Model", ""),
    "qwen3_5_moe": ("Qwen3_5MoeModel", "Qwen3_5MoeBaseModelOutputWithPast"),
}
DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")
# the text attention's varlen kwargs, which the stock get_*_features keep from the tower (transformers 5.24's list)
_FLASH_VARLEN_KWARGS = getattr(generic, "_FLASH_VARLEN_KWARGS", ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                                 "max_length_k"))
_PARAMETERS = ("self", "input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "pixel_values",
               "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids", "mm_encoder_outputs",
               "kwargs")
# named parameters of some families' stock forward, kept from the tower call like stock does:
_TEXT_ONLY = ("use_cache",)  # for the language model (Qwen2-VL, Qwen2.5-VL, Qwen3.5)
_POSITIONS_ONLY = ("second_per_grid_ts",)  # for compute_3d_position_ids (Qwen2.5-VL)


def _module(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _output_class(model_type: str) -> type:
    name = MERGED_MODELS[model_type][1]
    if not name:
        from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast
        return MultimodalBaseModelOutputWithPast
    return getattr(_module(model_type), name)


def placeholder_index(input_ids: torch.Tensor, token_id: int, count: int, name: str) -> torch.Tensor:
    """(count,) int64 positions of `token_id` in the flattened (B * L) `input_ids`, in order, sync-free.

    `count` is the number of feature rows to place; a different number of placeholders fails the check
    (at once on CPU, at the next sync on CUDA)."""
    where = input_ids.reshape(-1) == token_id
    torch._assert_async(where.sum() == count,
                        f"visual_merge: the {name} placeholder tokens of the batch do not match its {count} "
                        f"{name} feature rows")
    return torch.nonzero_static(where, size=count).squeeze(1)


def _merged_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    pixel_values=None, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                    mm_token_type_ids=None, mm_encoder_outputs=None, **kwargs):
    if (input_ids is None or inputs_embeds is not None or mm_encoder_outputs is not None or cache is not None
            or (pixel_values is None and pixel_values_videos is None) or kwargs.get("return_dict") is False
            or "past_key_values" in kwargs):
        return self._vltrain_merge_inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, **kwargs)
    kwargs.pop("return_dict", None)
    text_only = {k: kwargs.pop(k) for k in _TEXT_ONLY if k in kwargs}
    positions_only = {k: kwargs.pop(k) for k in _POSITIONS_ONLY if k in kwargs}
    embeds = self.get_input_embeddings()(input_ids)
    flat = embeds.reshape(-1, embeds.shape[-1])
    encoded, index, deepstack = {}, [], []
    if pixel_values is not None and pixel_values_videos is not None and _one_tower_call(self, kwargs):
        encoded = _media_features(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, **kwargs)
    for name, pixels, grid, token_id in (("image", pixel_values, image_grid_thw, self.config.image_token_id),
                                         ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id)):
        if pixels is None:
            continue
        # the instance's get_*_features: this kernel's (split on the host grid), or a wrapper of it
        # (vltrain.vision.shared_media: one tower pass per unique medium of a preference batch)
        out = encoded[name] if name in encoded else getattr(self, f"get_{name}_features")(
            pixels, grid, return_dict=True, **kwargs)
        features = torch.cat(out.pooler_output)
        at = placeholder_index(input_ids, token_id, features.shape[0], name)
        flat = flat.index_copy(0, at, features.to(flat.device, flat.dtype))
        if self._vltrain_merge_deepstack:
            deepstack.append([torch.cat(level) for level in out.deepstack_features])
        encoded[name] = out
        index.append(at)
    embeds = flat.view_as(embeds)
    if position_ids is None:
        position_ids = self.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, inputs_embeds=embeds,
            attention_mask=attention_mask, cache=cache, mm_token_type_ids=mm_token_type_ids, **positions_only)
    extra = {}
    if self._vltrain_merge_deepstack:  # the positions and features of both modalities, in one list per layer
        extra = {"visual_pos_masks": torch.cat(index),
                 "deepstack_visual_embeds": [torch.cat(layer) for layer in zip(*deepstack)]}
    outputs = self.language_model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                                  cache=cache, inputs_embeds=embeds, **text_only, **extra, **kwargs)
    return self._vltrain_merge_output(**outputs, image_outputs=encoded.get("image"),
                                      video_outputs=encoded.get("video"))


def _split_features(self, pixel_values, grid_thw, **kwargs):
    """get_image_features / get_video_features of the stock model, the per-medium split sizes taken from the
    host grid list (`vision_positions`' cached read) instead of a `.tolist()` of a device tensor."""
    out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, return_dict=True, **kwargs)
    return _per_medium(self, out, host_grids(grid_thw))


def _per_medium(self, out, grids):
    """The tower output `out` of the media `grids` with pooler_output (and DeepStack's features) split per medium."""
    merge = self.visual.spatial_merge_size
    sizes = [t * h * w // merge ** 2 for t, h, w in grids]
    out.pooler_output = torch.split(out.pooler_output, sizes)
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [torch.split(feature, sizes) for feature in out.deepstack_features]
    return out


_PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions")
_OWN_FEATURES = {"get_image_features": "_image_features", "get_video_features": "_video_features"}


def _one_tower_call(self, kwargs: dict) -> bool:
    """Whether one tower call may serve both modalities: the instance's get_*_features are this kernel's own
    (not a wrapper such as vltrain.vision.shared_media, which must see each modality's call), no precomputed
    modality-specific kwargs (`image_*` / `video_*`) and no per-layer outputs asked for."""
    own = all(getattr(getattr(self, method), "__func__", None) is globals()[func] for method, func in _OWN_FEATURES.items())
    return own and not any(k.startswith(("image_", "video_")) or k in _PER_LAYER_OUTPUTS and kwargs[k]
                           for k in kwargs)


def _media_features(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, **kwargs) -> dict:
    """{"image": ..., "video": ...}: what get_image_features and get_video_features return, from ONE tower call
    over the images followed by the videos. The tower attends within each medium (its cu_seqlens), so the
    features are those of two calls; the host runs the tower's modules once instead of twice (a training
    batch always holds both modalities: vltrain.vision.complete_modalities adds a dummy one where it lacks
    one, so two calls were the rule, one of them on a single dummy token)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _FLASH_VARLEN_KWARGS}  # text attention's, as stock drops
    dtype = self.visual.dtype
    grids = {"image": host_grids(image_grid_thw), "video": host_grids(video_grid_thw)}
    out = self.visual(torch.cat([pixel_values.type(dtype), pixel_values_videos.type(dtype)]),
                      grid_thw=concat_grids(image_grid_thw, video_grid_thw), return_dict=True, **kwargs)
    merge = self.visual.spatial_merge_size
    patches = [sum(t * h * w for t, h, w in grids[name]) for name in ("image", "video")]
    tokens = [n // merge ** 2 for n in patches]

    def split(value, what: str):
        if value is None:
            return None, None
        if isinstance(value, (list, tuple)):
            return tuple(map(list, zip(*(split(v, what) for v in value)))) if value else ([], [])
        for sizes in (tokens, patches):
            if torch.is_tensor(value) and value.shape[0] == sum(sizes):
                return torch.split(value, sizes)
        raise ValueError(f"visual_merge: cannot split the tower's {what} of shape {tuple(value.shape)} into "
                         f"{patches} patches / {tokens} merged tokens of images and videos")

    fields = {key: split(value, key) for key, value in out.items()}
    return {name: _per_medium(self, type(out)(**{key: parts[i] for key, parts in fields.items()}), grids[name])
            for i, name in enumerate(("image", "video"))}


# the stock decorators: modality-prefixed precomputed kwargs translated, `return_dict=False` a tuple
@accepts_precomputed_kwargs(modality="image")
@can_return_tuple
def _image_features(self, pixel_values, image_grid_thw=None, **kwargs):
    return _split_features(self, pixel_values, image_grid_thw, **kwargs)


@accepts_precomputed_kwargs(modality="video")
@can_return_tuple
def _video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
    return _split_features(self, pixel_values_videos, video_grid_thw, **kwargs)


def _indexed_deepstack(self, hidden_states, visual_pos_masks, visual_embeds):
    """hidden_states (B, L, H) + visual_embeds (N, H) at the N flat positions `visual_pos_masks` (int64)."""
    if visual_pos_masks.dtype == torch.bool:  # a caller of the stock convention (a mask)
        return self._vltrain_deepstack_inner(hidden_states, visual_pos_masks, visual_embeds)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat = flat.index_add(0, visual_pos_masks, visual_embeds.to(hidden_states.device, hidden_states.dtype))
    return flat.view_as(hidden_states)


def _is_patched(model) -> bool:
    return getattr(model.__dict__.get("forward"), "__func__", None) is _merged_forward


def patch_visual_merge(model, model_type: str) -> list[str]:
    """Patch the multimodal model's `forward` (and DeepStack's add) on this instance; [] if patched already.

    `model` is the whole model (a peft wrapper too) or the multimodal `Qwen*Model` itself. Raises
    ValueError (naming `model_type`) for an unknown family, a module of another class, or a class whose
    forward's parameters are not the ones this was written for; nothing is patched then."""
    if model_type not in MERGED_MODELS:
        raise ValueError(f"visual_merge: no multimodal model is known for model_type {model_type!r}; "
                         f"known: {sorted(MERGED_MODELS)}")
    cls = getattr(_module(model_type), MERGED_MODELS[model_type][0])
    inner = model if isinstance(model, cls) else get_module(model, family_spec(model_type).vision_module.rsplit(".", 1)[0])
    if type(inner) is not cls:
        raise ValueError(f"visual_merge: found a {type(inner).__qualname__}, not the {cls.__qualname__} of "
                         f"model_type {model_type!r}; cannot patch it")
    if _is_patched(inner):
        return []
    parameters = tuple(inspect.signature(cls.forward).parameters)
    if not set(_PARAMETERS) <= set(parameters) or not set(parameters) <= {*_PARAMETERS, *_TEXT_ONLY, *_POSITIONS_ONLY}:
        raise ValueError(f"visual_merge: {cls.__qualname__}.forward of model_type {model_type!r} takes "
                         f"{list(parameters)}, not the parameters it was written for (transformers 5.24); "
                         f"leave the kernel out")
    inner._vltrain_merge_deepstack = model_type in DEEPSTACK
    inner._vltrain_merge_output = _output_class(model_type)
    inner._vltrain_merge_inner = inner.forward
    inner.forward = types.MethodType(_merged_forward, inner)
    inner.get_image_features = types.MethodType(_image_features, inner)
    inner.get_video_features = types.MethodType(_video_features, inner)
    patched = [f"visual_merge: {cls.__qualname__}.forward (placeholders by integer index, index_copy; images and "
               "videos in one tower call), get_image_features / get_video_features (split on the host grid)"]
    if inner._vltrain_merge_deepstack:
        text = inner.language_model
        text._vltrain_deepstack_inner = text._deepstack_process
        text._deepstack_process = types.MethodType(_indexed_deepstack, text)
        patched.append(f"visual_merge: {type(text).__qualname__}._deepstack_process (index_add)")
    return patched
