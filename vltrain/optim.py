"""Optimizer (AdamW over the named parameter groups) and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch

from vltrain.trainable import param_groups


def build_optimizer(model, optim_cfg, *, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; `cpu_offload` (DeepSpeed optimizer offload) uses DeepSpeed's CPU Adam
    with the same groups, since a torch optimizer cannot step offloaded parameters efficiently."""
    groups = param_groups(model, optim_cfg)
    kwargs = dict(betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if cpu_offload:
        if optim_cfg.optimizer != "adamw":
            raise ValueError(f"optim.optimizer={optim_cfg.optimizer} cannot be combined with DeepSpeed optimizer offload")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if optim_cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optim.optimizer=adamw_8bit needs bitsandbytes (pip install 'vltrain[bnb]')") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of each group's base lr at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = optim_cfg.warmup_steps if optim_cfg.warmup_steps is not None else int(optim_cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step, warmup_steps=warmup, total_steps=total_steps, kind=optim_cfg.scheduler,
            min_lr_ratio=optim_cfg.min_lr_ratio,
        ),
    )
