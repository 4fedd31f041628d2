"""One build path for every recipe: the policy model in the one order that works, and its reference model.

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=cfg.data.packing, device=accelerator.device)
    print0("\\n".join(built.report))
    reference = build_reference(built.model, accelerator)   # DPO / GRPO: frozen copy, or LoRA with adapters off

The order is fixed because each step needs what the one before it made:
  1. load (4/8-bit LLM linears when lora.bits < 16)
  2. packed attention (changes the text attention implementation; kernels patch around it)
  3. kernels (patch the loaded modules before anything wraps them)
  4. what trains fully (trainable.*)
  5. adapters on the rest (peft wraps the model; fully trained modules become modules_to_save)
  6. gradient checkpointing (on the final module tree)
Nothing here touches the Accelerator except through `vltrain.distributed` (the reference's preparation).
"""

from __future__ import annotations

import copy
import contextlib
from dataclasses import dataclass, field

import torch

from vltrain.families import FamilySpec, family_spec


@dataclass
class BuiltModel:
    model: torch.nn.Module
    processor: object
    spec: FamilySpec
    report: list[str] = field(default_factory=list)  # what was loaded, patched and made trainable, one line each
    trainable: dict[str, int] = field(default_factory=dict)  # trainable parameters per component


def build_model(model_cfg, trainable_cfg, lora_cfg, *, packing: bool = False, device=None) -> BuiltModel:
    """Load and prepare the model to train (see the module docstring for the order); `device` places a
    quantized (QLoRA) base, everything else is moved by `accelerator.prepare`."""
    from vltrain.lora import apply_lora, load_model_for_lora
    from vltrain.models import enable_gradient_checkpointing
    from vltrain.trainable import configure_trainable, trainable_counts

    model, processor = load_model_for_lora(model_cfg, lora_cfg, device)  # plain load_model when lora.bits == 16
    spec = family_spec(model)
    report = [f"model: {model_cfg.name_or_path} ({spec.model_type}, {model_cfg.dtype}, "
              f"attention {model.config._attn_implementation})"]
    if packing:
        from vltrain.attention import enable_packed_attention

        report += enable_packed_attention(model)
    if model_cfg.kernels:
        from vltrain.kernels import apply_kernels

        report.append("kernels: " + "; ".join(apply_kernels(model, model_cfg.kernels)))
    if lora_cfg.enabled:
        configure_trainable(model, trainable_cfg, adapters_follow=True)  # what trains fully; adapters go on the rest
        model = apply_lora(model, lora_cfg, base_name=model_cfg.name_or_path)
        counts = trainable_counts(model)
        report.append(f"LoRA rank {lora_cfg.rank} alpha {lora_cfg.alpha}"
                      + (" (DoRA)" if lora_cfg.use_dora else "") + (f", {lora_cfg.bits}-bit base" if lora_cfg.bits != 16 else ""))
    else:
        counts = configure_trainable(model, trainable_cfg)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, model_cfg.checkpoint_every_n_layers)
        report.append(f"gradient checkpointing: every {model_cfg.checkpoint_every_n_layers} layer(s), non-reentrant")
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    report.append(f"parameters: {total:,}; trainable " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return BuiltModel(model, processor, spec, report, counts)


class Reference:
    """The reference model of preference / RL losses: call it inside `with reference() as model:`.

    Two kinds, chosen by `build_reference`:
    - adapters off: the (prepared) LoRA policy itself with its adapters disabled -- peft then also runs the
      original copy of every fully trained module (modules_to_save), so the reference is exactly the base. No
      second copy of the weights.
    - frozen copy: a deep copy of the policy taken before training, frozen, in eval mode, prepared for the
      backend like the policy (sharded under ZeRO-3 / FSDP2) but never given to the optimizer or the checkpoint.
    Either way the forward runs without gradients and with dropout off.
    """

    def __init__(self, module, *, adapters_off: bool):
        self.module, self.adapters_off = module, adapters_off

    @contextlib.contextmanager
    def __call__(self):
        model = self.module
        base = getattr(model, "module", model)  # DDP's wrapper: peft's context manager lives on the inner model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (base.disable_adapter() if self.adapters_off else contextlib.nullcontext()):
                yield model
        finally:
            model.train(was_training)


def build_reference(policy, accelerator, *, prepared_policy=None) -> Reference:
    """A `Reference` for `policy` (the model as `build_model` returned it, before `accelerator.prepare`).

    A peft policy gives the adapters-off reference: pass the prepared policy as `prepared_policy` (the same
    weights the optimizer updates). Otherwise the policy is deep-copied (same dtype, same instance kernels --
    deepcopy rebinds their bound methods -- same attention implementation), frozen and prepared by
    `vltrain.distributed.prepare_frozen_model`. Call this before training starts: the copy is the
    starting policy."""
    if hasattr(policy, "peft_config"):
        return Reference(prepared_policy if prepared_policy is not None else policy, adapters_off=True)
    from vltrain.distributed import prepare_frozen_model

    frozen = copy.deepcopy(policy)
    frozen.requires_grad_(False)
    frozen.eval()
    if getattr(frozen, "is_activation_checkpointing", getattr(frozen, "is_gradient_checkpointing", False)):
        frozen.gradient_checkpointing_disable()  # no backward through the reference: recomputing buys nothing
    return Reference(prepare_frozen_model(accelerator, frozen), adapters_off=False)
