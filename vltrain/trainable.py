"""Which parameters train: freeze vision tower / merger / LLM, unfreeze the top-k layers, and the
named parameter groups (vision / merger / llm, and a classifier's head) that the optimizer gives their own
learning rates."""

from __future__ import annotations

import torch

from vltrain.families import FamilySpec, family_spec, get_module

PEFT_PREFIX = "base_model.model."
BACKBONE_PREFIX, HEAD_PREFIX = "backbone.", "head."  # vltrain.classifier.VLClassifier's two parts


def _strip_peft(name: str) -> str:
    name = name[len(BACKBONE_PREFIX):] if name.startswith(BACKBONE_PREFIX) else name
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def param_component(name: str, spec: FamilySpec) -> str:
    """'head', 'merger', 'vision' or 'llm' for a parameter name (peft and classifier prefixes tolerated)."""
    if name.startswith(HEAD_PREFIX):
        return "head"
    name = _strip_peft(name)
    if any(name.startswith(m + ".") for m in spec.merger_modules):
        return "merger"
    if name.startswith(spec.vision_module + "."):
        return "vision"
    return "llm"


def _set(module: torch.nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def configure_trainable(model, cfg, *, adapters_follow: bool = False) -> dict[str, int]:
    """Apply `TrainableConfig` to a plain (non-peft) model; returns trainable parameter counts per component.

    Everything frozen is an error, unless `adapters_follow` (LoRA adds the trainable parameters next)."""
    spec = family_spec(model)
    visual = get_module(model, spec.vision_module)
    mergers = [get_module(model, m) for m in spec.merger_modules]
    llm = [get_module(model, spec.llm_module), get_module(model, spec.lm_head)]

    for m in llm:
        _set(m, not cfg.freeze_llm)
    _set(visual, not cfg.freeze_vision_tower)
    for m in mergers:
        _set(m, not cfg.freeze_merger)  # after the tower: mergers live inside model.visual

    if cfg.unfreeze_topk_llm:
        layers = get_module(model, spec.llm_layers)
        if cfg.unfreeze_topk_llm > len(layers):
            raise ValueError(f"trainable.unfreeze_topk_llm={cfg.unfreeze_topk_llm} but the LLM has {len(layers)} layers")
        for layer in layers[-cfg.unfreeze_topk_llm:]:
            _set(layer, True)
    if cfg.unfreeze_topk_vision:
        blocks = get_module(model, spec.vision_blocks)
        if cfg.unfreeze_topk_vision > len(blocks):
            raise ValueError(
                f"trainable.unfreeze_topk_vision={cfg.unfreeze_topk_vision} but the vision tower has {len(blocks)} blocks"
            )
        for block in blocks[-cfg.unfreeze_topk_vision:]:
            _set(block, True)
    counts = trainable_counts(model)
    if sum(counts.values()) == 0 and not adapters_follow:
        raise ValueError("the trainable.* settings freeze every parameter: nothing would train")
    return counts


def trainable_counts(model) -> dict[str, int]:
    spec = family_spec(model)
    counts = {"llm": 0, "vision": 0, "merger": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            component = param_component(name, spec)
            counts[component] = counts.get(component, 0) + getattr(p, "ds_numel", p.numel())  # ZeRO-3: p is a stub
    return counts


def _no_decay_names(model) -> set[str]:
    """Biases, norm weights and embedding tables: every 0/1-D parameter and every nn.Embedding weight."""
    names = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if len(getattr(p, "ds_shape", p.shape)) < 2 or isinstance(module, torch.nn.Embedding) or "norm" in module_name.rsplit(".", 1)[-1]:
                names.add(full)
    return names


def param_groups(model, optim_cfg) -> list[dict]:
    """Optimizer groups: one per (component, decay) pair that has trainable parameters, each with its
    own `lr` and a `name` so logs and tests can see the groups are in effect."""
    spec = family_spec(model)
    lrs = {
        "llm": optim_cfg.lr,
        "vision": optim_cfg.vision_lr if optim_cfg.vision_lr is not None else optim_cfg.lr,
        "merger": optim_cfg.merger_lr if optim_cfg.merger_lr is not None else optim_cfg.lr,
        "head": optim_cfg.head_lr if optim_cfg.head_lr is not None else optim_cfg.lr,
    }
    no_decay = _no_decay_names(model)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (param_component(name, spec), name not in no_decay)
        groups.setdefault(key, []).append(p)
    return [
        {
            "name": f"{component}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": lrs[component],
            "weight_decay": optim_cfg.weight_decay if decay else 0.0,
        }
        for (component, decay), params in sorted(groups.items())
    ]
