"""LoRA / DoRA / QLoRA through peft, for every family in `vltrain.families`.

    model, processor = load_model_for_lora(cfg.model, cfg.lora, device)   # 4/8-bit base when lora.bits < 16
    configure_trainable(model, cfg.trainable, adapters_follow=True)       # what trains *fully*
    model = apply_lora(model, cfg.lora, base_name=cfg.model.name_or_path) # adapters on the rest

Targets come from the family table: the LLM's attention + MLP linears (`llm_lora_regex`), plus the
vision blocks with `lora.vision_lora` and the mergers with `lora.vision_lora_merger`; MoE expert
weights (fused 3-D parameters) through peft `target_parameters` with `lora.moe_experts`. Only
`nn.Linear` modules are targeted (a merger regex can match a GELU), `lora.namespan_exclude` drops
names containing any of its substrings, `lora.num_lora_modules=N` keeps the last N.

Modules the user trains fully (`trainable.*`: an unfrozen vision tower, merger, top-k layers) get no
adapters; they become peft `modules_to_save`, so the adapter folder (and a merge) carries their
weights. peft keeps a frozen copy of each such module (`original_module`), which costs its size once more in
memory (a whole vision tower beside LLM adapters: 0.68 B parameters for Qwen2.5-VL-7B). The copy is used only
when the adapters are switched off -- which DPO's and GRPO's LoRA reference does (the policy with adapters
off must be the starting model, tower included). `apply_lora(..., keep_frozen_copies=False)` (SFT and
classification, and DPO / GRPO runs without a reference) replaces each copy with a stub that raises if it is
ever called, so a run that needs the copy fails loudly instead of computing with trained weights.

`merge_adapter(adapter_dir, ...)` loads a base model, loads the adapter with strict key checks and
returns the merged model; `recipes/merge_lora.py` and the LoRA export both use it.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch

from vltrain.families import family_spec

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------- targets
def _fully_trainable(module: torch.nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def fully_trained_modules(model) -> list[str]:
    """The top-most modules whose parameters all train (ModuleLists are looked into, never returned:
    peft's wrapper around a ModuleList would break iteration over it)."""
    found: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if prefix and _fully_trainable(module) and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            found.append(prefix)
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and prefix:
            # a trainable parameter directly on a partly frozen module: cannot be saved as a module
            raise ValueError(f"parameters {own} of {prefix!r} train but the rest of that module is frozen; "
                             "peft can only keep whole modules fully trainable next to adapters")

    visit("", model)
    return found


def lora_target_modules(model, lora_cfg) -> list[str]:
    """Full names of the nn.Linear modules that get adapters, in model order."""
    spec = family_spec(model)
    pattern = spec.llm_lora_regex()
    if lora_cfg.vision_lora:
        pattern += "|" + spec.vision_lora_regex(include_merger=lora_cfg.vision_lora_merger)
    regex = re.compile(pattern)
    names = [
        name for name, module in model.named_modules()
        if regex.search(name) and isinstance(module, torch.nn.Linear)
        and not any(s in name for s in lora_cfg.namespan_exclude)
        and not _fully_trainable(module)  # trained fully by the user's choice: no adapter
    ]
    if lora_cfg.num_lora_modules > 0:
        names = names[-lora_cfg.num_lora_modules:]
    return names


def lora_target_parameters(model, lora_cfg) -> list[str]:
    """Full names of fused MoE expert parameters that get adapters (`lora.moe_experts`)."""
    spec = family_spec(model)
    if not lora_cfg.moe_experts:
        return []
    if not spec.moe:
        raise ValueError(f"lora.moe_experts=true but {spec.model_type} has no experts")
    return [
        name for name, p in model.named_parameters()
        if name.endswith(spec.moe_expert_parameters) and not p.requires_grad
        and not any(s in name for s in lora_cfg.namespan_exclude)
    ]


class DroppedCopy(torch.nn.Module):
    """Stands in for peft's frozen copy of a fully trained module (see the module docstring)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def _message(self) -> str:
        return (f"the frozen copy of {self.name} was dropped (vltrain.lora: keep_frozen_copies=False) but the "
                "adapters were switched off: this run needs it (a LoRA reference model)")

    def forward(self, *args, **kwargs):
        raise RuntimeError(self._message())

    def __getattr__(self, name: str):  # peft reads attributes (dtype, ...) of the copy when adapters are off
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(f"{name!r}: {self._message()}") from None


def drop_frozen_copies(model) -> dict[str, int]:
    """Replace the frozen `original_module` of every peft modules_to_save wrapper with a `DroppedCopy`;
    returns {module name: parameters freed}."""
    from peft.utils.other import ModulesToSaveWrapper

    freed = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and not isinstance(module.original_module, DroppedCopy):
            freed[name] = sum(p.numel() for p in module.original_module.parameters())
            module.original_module = DroppedCopy(name)
    return freed


def apply_lora(model, lora_cfg, base_name: str | None = None, *, keep_frozen_copies: bool = True):
    """Wrap `model` (after `configure_trainable`) in a peft model: adapters on the targets, every
    fully-trainable module kept trainable as `modules_to_save` (with peft's frozen copy of it unless
    `keep_frozen_copies` is False: see the module docstring). Returns the PeftModel."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = lora_target_modules(model, lora_cfg)
    target_params = lora_target_parameters(model, lora_cfg)
    if not targets and not target_params:
        raise ValueError("lora.enabled=true but no module matches the LoRA targets "
                         "(check lora.namespan_exclude / lora.num_lora_modules)")
    keep = fully_trained_modules(model)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        bias=lora_cfg.bias,
        use_dora=lora_cfg.use_dora,
        # exact names: peft treats a string as a regex and a list as suffixes; anchor every name
        target_modules=rf"^({'|'.join(re.escape(t) for t in targets)})$" if targets else None,
        target_parameters=target_params or None,
        modules_to_save=keep or None,
        base_model_name_or_path=base_name,
    )
    model = get_peft_model(model, peft_cfg)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    log.info("LoRA: %d target modules, %d target parameters, %d fully trained modules (%s)",
             len(targets), len(target_params), len(keep), ", ".join(keep) or "none")
    if not keep_frozen_copies and keep:
        freed = drop_frozen_copies(model)
        log.info("LoRA: dropped peft's frozen copies of the fully trained modules (%s parameters; the adapters "
                 "cannot be switched off in this run)", f"{sum(freed.values()):,}")
    return model


# ------------------------------------------------------------------------------------- QLoRA
def quantization_config(model_cfg, lora_cfg):
    """A BitsAndBytesConfig for lora.bits 4 (nf4, double quant) or 8; vision tower and lm_head stay
    in the training dtype."""
    from transformers import BitsAndBytesConfig

    from vltrain.models import DTYPES

    spec = family_spec(model_cfg.name_or_path.split(":", 1)[1]) if model_cfg.name_or_path.startswith("tiny:") else None
    skip = [spec.vision_module, spec.lm_head] if spec else None
    compute = DTYPES[model_cfg.dtype] if model_cfg.dtype != "float32" else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=lora_cfg.bits == 4,
        load_in_8bit=lora_cfg.bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip,
    )


def load_model_for_lora(model_cfg, lora_cfg, device=None):
    """`load_model`, with the LLM's linears in 4/8 bit when `lora.bits` < 16 (QLoRA).

    A `tiny:` model is built, written to a temporary folder and reloaded through `from_pretrained`,
    the same quantizing path a real checkpoint takes."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vltrain.models import DTYPES, load_model

    if lora_cfg.bits == 16:
        return load_model(model_cfg)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"lora.bits={lora_cfg.bits} needs bitsandbytes (pip install bitsandbytes)") from None
    qcfg = quantization_config(model_cfg, lora_cfg)
    device_map = {"": str(device) if device is not None else "cpu"}
    name = model_cfg.name_or_path
    if qcfg.llm_int8_skip_modules is None:
        from vltrain.models import _load_config

        spec = family_spec(_load_config(name, model_cfg.trust_remote_code))
        qcfg.llm_int8_skip_modules = [spec.vision_module, spec.lm_head]
    if not name.startswith("tiny:"):
        return load_model(model_cfg, quantization_config=qcfg, device_map=device_map)
    model, processor = load_model(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        attn = model.config._attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(
            tmp, dtype=DTYPES[model_cfg.dtype], quantization_config=qcfg, device_map=device_map,
            attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code,
        )
    return model, processor


# ---------------------------------------------------------------------------------------- merge
def load_adapter_strict(model, adapter_dir: str | Path):
    """Wrap `model` (a plain base) with the adapter in `adapter_dir`; every adapter key must land on
    a model parameter and every adapter parameter of the model must be in the file, else ValueError
    naming the keys."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{adapter_dir} is not an adapter folder (no {ADAPTER_WEIGHTS})")
    peft_cfg = PeftConfig.from_pretrained(str(adapter_dir))
    peft_cfg.inference_mode = False
    model = get_peft_model(model, peft_cfg)
    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state)
    unexpected = sorted(result.unexpected_keys)
    adapter_names = {n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    missing = sorted(k for k in result.missing_keys if k in adapter_names)
    if unexpected or missing:
        raise ValueError(
            f"adapter {adapter_dir} does not match the base model: "
            + (f"keys in the adapter with no place in the model: {unexpected[:10]}" if unexpected else "")
            + (f"{'; ' if unexpected else ''}adapter parameters missing from the file: {missing[:10]}" if missing else "")
        )
    return model


def merge_adapter(adapter_dir: str | Path, base: str | None = None, dtype: str | None = None):
    """(merged model, processor): the base (default: the adapter's `base_model_name_or_path`) in
    `dtype` (default: the training dtype recorded next to the adapter), unquantized, with the
    adapter merged in."""
    from transformers import AutoProcessor

    from vltrain.config import ModelConfig
    from vltrain.models import load_model

    adapter_dir = Path(adapter_dir)
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model: pass --base")
    recorded = adapter_dir / "vltrain_config.yaml"
    trained = {}
    if recorded.is_file():
        import yaml

        trained = yaml.safe_load(recorded.read_text()).get("model") or {}
    dtype = dtype or trained.get("dtype", "float32")
    trust = bool(trained.get("trust_remote_code", False))  # the run's own choice; never on by default
    model, processor = load_model(ModelConfig(name_or_path=base, dtype=dtype, attn_implementation="sdpa",
                                              trust_remote_code=trust))
    model = load_adapter_strict(model, adapter_dir)
    merged = model.merge_and_unload()
    if (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(adapter_dir), trust_remote_code=trust)
    return merged, processor
