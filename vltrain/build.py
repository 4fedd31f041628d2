"""One build path for every recipe: the policy model in the one order that works, and its reference model.

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=cfg.data.packing, device=accelerator.device)
    print0("\\n".join(built.report))
    reference = build_reference(built.model, cfg.model)   # before accelerator.prepare: frozen copy or adapters off
    model, optimizer = accelerator.prepare(built.model, optimizer)
    reference.prepare(accelerator, model)      # placed like the policy (ZeRO-3 / FSDP2 sharded), never checkpointed

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


def _load_and_patch(model_cfg, lora_cfg, *, packing: bool, device=None):
    """Steps 1-3: (model, processor, report lines)."""
    from vltrain.lora import load_model_for_lora

    model, processor = load_model_for_lora(model_cfg, lora_cfg, device)  # plain load_model when lora.bits == 16
    report = [f"model: {model_cfg.name_or_path} ({family_spec(model).model_type}, {model_cfg.dtype}, "
              f"attention {model.config._attn_implementation})"]
    if packing:
        from vltrain.attention import enable_packed_attention

        report += enable_packed_attention(model)
    if model_cfg.kernels:
        from vltrain.kernels import apply_kernels

        report.append("kernels: " + "; ".join(apply_kernels(model, model_cfg.kernels)))
    return model, processor, report


def build_model(model_cfg, trainable_cfg, lora_cfg, *, packing: bool = False, device=None,
                allow_frozen: bool = False, lora_reference: bool = False) -> BuiltModel:
    """Load and prepare the model to train (see the module docstring for the order); `device` places a
    quantized (QLoRA) base, everything else is moved by `accelerator.prepare`. `allow_frozen`: a fully
    frozen model is allowed (a classifier's head trains on top of it). `lora_reference`: the run will use
    the policy with its adapters off as a reference (DPO, GRPO with a KL term), so peft's frozen copies of
    the fully trained modules are kept; otherwise they are dropped (vltrain.lora: their size in memory)."""
    from vltrain.lora import apply_lora
    from vltrain.models import enable_gradient_checkpointing
    from vltrain.trainable import configure_trainable, trainable_counts

    model, processor, report = _load_and_patch(model_cfg, lora_cfg, packing=packing, device=device)
    spec = family_spec(model)
    if lora_cfg.enabled:
        configure_trainable(model, trainable_cfg, adapters_follow=True)  # what trains fully; adapters go on the rest
        model = apply_lora(model, lora_cfg, base_name=model_cfg.name_or_path, keep_frozen_copies=lora_reference)
        counts = trainable_counts(model)
        report.append(f"LoRA rank {lora_cfg.rank} alpha {lora_cfg.alpha}"
                      + (" (DoRA)" if lora_cfg.use_dora else "") + (f", {lora_cfg.bits}-bit base" if lora_cfg.bits != 16 else ""))
    else:
        counts = configure_trainable(model, trainable_cfg, adapters_follow=allow_frozen)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, model_cfg.checkpoint_every_n_layers)
        report.append(f"gradient checkpointing: every {model_cfg.checkpoint_every_n_layers} layer(s), non-reentrant")
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    report.append(f"parameters: {total:,}; trainable " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return BuiltModel(model, processor, spec, report, counts)


class Reference:
    """The reference model of preference / RL losses: `reference.prepare(accelerator, prepared_policy)` once
    after `accelerator.prepare(policy, ...)`, then call it inside `with reference() as model:`.

    Two kinds, chosen by `build_reference`:
    - adapters off: the (prepared) LoRA policy itself with its adapters disabled -- peft then also runs the
      original copy of every fully trained module (modules_to_save), so the reference is exactly the base. No
      second copy of the weights.
    - frozen copy: a deep copy of the policy taken before training, frozen, in eval mode, placed for the
      backend like the policy (sharded under ZeRO-3 / FSDP2, see vltrain.distributed.prepare_frozen_model) but
      never given to the optimizer or the checkpoint.
    Either way the forward runs without gradients and with dropout off.
    """

    def __init__(self, module, *, adapters_off: bool):
        self.module, self.adapters_off, self.prepared = module, adapters_off, False

    def prepare(self, accelerator, prepared_policy=None) -> "Reference":
        """Place the reference like the policy: the adapters-off kind becomes the prepared policy (the weights
        the optimizer updates); the frozen copy is placed by `prepare_frozen_model`."""
        if self.adapters_off:
            if prepared_policy is None:
                raise ValueError("an adapters-off reference needs the prepared policy: reference.prepare(accelerator, model)")
            self.module = prepared_policy
        else:
            from vltrain.distributed import prepare_frozen_model

            self.module = prepare_frozen_model(accelerator, self.module)
        self.prepared = True
        return self

    @contextlib.contextmanager
    def __call__(self):
        model = self.module
        base = getattr(model, "module", model)  # DDP / DeepSpeed wrappers: peft's context manager is on the inner model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (base.disable_adapter() if self.adapters_off else contextlib.nullcontext()):
                yield model
        finally:
            model.train(was_training)


def build_reference(policy, model_cfg=None, *, packing: bool = False) -> Reference:
    """A `Reference` for `policy` as `build_model` returned it, BEFORE `accelerator.prepare` (the reference is
    the starting policy, and ZeRO-3 partitions the policy's parameters in place).

    A peft policy gives the adapters-off reference. Otherwise the policy is deep-copied (same dtype, same
    instance kernels -- deepcopy rebinds their bound methods -- same attention implementation) and frozen;
    where ZeRO-3 has already partitioned the policy at load (accelerate turns zero.Init on for
    `from_pretrained` under ZeRO-3), a copy would copy empty shards, so the model is loaded again from
    `model_cfg` with the same packing and kernels -- the same weights as the untrained policy."""
    if hasattr(policy, "peft_config"):
        from vltrain.lora import DroppedCopy

        if any(isinstance(m, DroppedCopy) for m in policy.modules()):
            raise ValueError("this LoRA policy was built without peft's frozen copies of its fully trained modules: "
                             "build it with build_model(..., lora_reference=True) to use it as its own reference")
        return Reference(policy, adapters_off=True)
    if any(hasattr(p, "ds_id") for p in policy.parameters()):
        if model_cfg is None:
            raise ValueError("build_reference: the policy is ZeRO-3-partitioned; pass its model config to load the "
                             "reference again")
        from vltrain.config import LoraConfig

        frozen, _, _ = _load_and_patch(model_cfg, LoraConfig(), packing=packing)
    else:
        frozen = copy.deepcopy(policy)
        if getattr(frozen, "is_activation_checkpointing", getattr(frozen, "is_gradient_checkpointing", False)):
            frozen.gradient_checkpointing_disable()  # no backward through the reference: recomputing buys nothing
    frozen.requires_grad_(False)
    frozen.eval()
    return Reference(frozen, adapters_off=False)
