"""Loading a Qwen-VL model and its processor (hub id, local folder, or `tiny:<model_type>`)."""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vltrain.families import family_spec

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn is importable and CUDA is up, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 but flash-attn is not installed")
        return requested
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def check_linear_attention_backend(model_type: str) -> None:
    """Raise before loading a Qwen3.5 model that could not train here: when flash-linear-attention is
    installed transformers (and vltrain's packed path) use it, and fla 0.6 refuses the gated delta rule's
    backward on Hopper GPUs with Triton 3.4-3.7.0 unless tilelang is installed -- an error that would
    otherwise come at the first backward, after the model and data have loaded."""
    if not family_spec(model_type).linear_attention or importlib.util.find_spec("fla") is None:
        return
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # another fla version: its own checks apply
        return
    if IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1 and importlib.util.find_spec("tilelang") is None:
        import triton

        raise ValueError(
            f"{model_type}: flash-linear-attention is installed, and on this Hopper GPU with Triton {triton.__version__} "
            "it refuses the backward of the gated delta rule (wrong results with Triton >= 3.4, < 3.7.1). Upgrade "
            "Triton to >= 3.7.1, install tilelang, or uninstall flash-linear-attention (slower torch fallback).")


def _load_config(name: str, trust_remote_code: bool):
    """The model's config, or one line saying why `model.name_or_path` is not a model."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"model.name_or_path={name!r} is a file; it must be a model folder (with config.json) or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model.name_or_path={name!r} is a folder without config.json: not a saved model")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise ValueError(f"model.name_or_path={name!r}: no such folder")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:  # a hub id that cannot be reached or does not exist
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.name_or_path={name!r}: cannot load its config ({first})") from None


def check_model_path(model_cfg) -> None:
    """One line when `model.name_or_path` is not a supported model (reads its config only, no weights)."""
    if not model_cfg.name_or_path.startswith("tiny:"):
        family_spec(_load_config(model_cfg.name_or_path, model_cfg.trust_remote_code))


def load_model(model_cfg, **from_pretrained_kwargs):
    """(model, processor) for `model_cfg`; the family is checked from `config.model_type` before loading."""
    dtype = DTYPES[model_cfg.dtype]
    attn = resolve_attn_implementation(model_cfg.attn_implementation)
    name = model_cfg.name_or_path
    if name.startswith("tiny:"):
        from vltrain.tiny import build_tiny

        model_type = name.split(":", 1)[1]
        check_linear_attention_backend(model_type)
        model, processor = build_tiny(model_type, dtype=dtype)
        model.set_attn_implementation(attn) if attn != "sdpa" else None
    else:
        config = _load_config(name, model_cfg.trust_remote_code)
        family_spec(config)  # a clear error for a model that is not a supported Qwen-VL family
        check_linear_attention_backend(config.model_type)
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code,
            **from_pretrained_kwargs,
        )
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    log.info("loaded %s (%s, %s, attention=%s)", name, model.config.model_type, model_cfg.dtype, attn)
    return model, processor


def enable_gradient_checkpointing(model, every_n_layers: int = 1) -> None:
    """Non-reentrant checkpointing: unfrozen vision blocks get real gradients even when the block inputs
    (pixel patches) do not require grad, which the reentrant variant silently drops.
    `every_n_layers` > 1 recomputes only every n-th layer (transformers >= 5.23)."""
    if every_n_layers < 1:
        raise ValueError(f"model.checkpoint_every_n_layers must be >= 1, got {every_n_layers}")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError("model.checkpoint_every_n_layers > 1 needs transformers >= 5.23")
    for config in (model.config, getattr(model.config, "text_config", None)):  # the decoder reads text_config's
        if config is not None:
            config.use_cache = False
