"""Loading a Qwen-VL model and its processor (hub id, local folder, or `tiny:<model_type>`)."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.utils.checkpoint
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


def load_model(model_cfg, **from_pretrained_kwargs):
    """(model, processor) for `model_cfg`; the family is checked from `config.model_type` before loading."""
    dtype = DTYPES[model_cfg.dtype]
    attn = resolve_attn_implementation(model_cfg.attn_implementation)
    name = model_cfg.name_or_path
    if name.startswith("tiny:"):
        from vltrain.tiny import build_tiny

        model, processor = build_tiny(name.split(":", 1)[1], dtype=dtype)
        model.set_attn_implementation(attn) if attn != "sdpa" else None
    else:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
        family_spec(config)  # a clear error for a model that is not a supported Qwen-VL family
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code,
            **from_pretrained_kwargs,
        )
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    log.info("loaded %s (%s, %s, attention=%s)", name, model.config.model_type, model_cfg.dtype, attn)
    return model, processor


# Ops whose outputs the "save_matmuls" policy keeps: every matmul and every attention kernel. What is left to
# recompute in the backward is the cheap elementwise work (norms, rotary, activations, residual adds).
_SAVED_OP_NAMES = frozenset({
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default", "aten._scaled_mm.default",
    "aten._flash_attention_forward.default", "aten._efficient_attention_forward.default",
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "torch_attn._varlen_attn.default",
})
CHECKPOINT_POLICIES = ("full", "save_matmuls")


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if str(op) in _SAVED_OP_NAMES else CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmuls_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def enable_gradient_checkpointing(model, every_n_layers: int = 1, policy: str = "full",
                                  skip_last_layers: int = 0) -> list[str]:
    """Non-reentrant checkpointing: unfrozen vision blocks get real gradients even when the block inputs
    (pixel patches) do not require grad, which the reentrant variant silently drops.

    `every_n_layers` > 1 recomputes only every n-th layer (transformers >= 5.23). `policy="save_matmuls"` is
    torch's selective checkpointing on the LLM decoder layers: they keep their matmul and attention outputs
    and the backward recomputes only their elementwise ops (~2 bytes x (sum of out-features + hidden) per
    token per layer; the vision blocks, with half the FLOPs per saved byte, are still recomputed whole).
    `skip_last_layers` leaves the last k LLM decoder layers un-checkpointed (all activations kept).
    Returns what was enabled, for the log."""
    if every_n_layers < 1:
        raise ValueError(f"model.checkpoint_every_n_layers must be >= 1, got {every_n_layers}")
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"model.checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("model.checkpoint_every_n_layers > 1 needs transformers >= 5.23")
    model.config.use_cache = False
    layers = llm_decoder_layers(model)
    done = [f"gradient checkpointing (every {every_n_layers} layer(s))"]
    if policy == "save_matmuls":
        selective = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                      context_fn=_save_matmuls_context)
        for layer in layers:
            layer._gradient_checkpointing_func = selective
        done.append("LLM layers keep matmul/attention outputs (save_matmuls)")
    if skip_last_layers:
        if not 0 < skip_last_layers <= len(layers):
            raise ValueError(f"model.checkpoint_skip_last_layers must be between 0 and the {len(layers)} LLM "
                             f"layers, got {skip_last_layers}")
        for layer in layers[len(layers) - skip_last_layers:]:
            layer.gradient_checkpointing = False
        done.append(f"last {skip_last_layers} of {len(layers)} LLM layers not checkpointed")
    return done


def llm_decoder_layers(model) -> torch.nn.ModuleList:
    """The LLM's decoder layers, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(family_spec(base).llm_layers)
