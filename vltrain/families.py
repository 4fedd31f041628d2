"""Everything that differs between Qwen-VL generations, in one table keyed by `config.model_type`.

Loops and setup code ask this table; nothing else in vltrain branches on the family, and nothing
ever looks at a checkpoint's name. The one piece of model code the data layer needs -- the mRoPE ids of
packed examples -- is here too (`RopeIndex`), so vltrain.data never imports model classes itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

_LLM_ATTN_MLP = r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
_LLM_LINEAR_ATTN = r"linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)"


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    vision_mlp: str  # regex (relative to a vision block) of the block's MLP linears
    merger_modules: tuple[str, ...] = ("model.visual.merger",)
    timestamped_video: bool = False  # Qwen3.x writes `<t seconds>` before each temporal group
    window_attention: bool = False  # Qwen2.5-VL vision windows (the varlen kernel applies)
    linear_attention: bool = False  # Qwen3.5 gated-delta-net layers
    moe: bool = False
    moe_expert_parameters: tuple[str, ...] = ()
    llm_lora_targets: str = _LLM_ATTN_MLP
    patch_size: int = 14
    vision_module: str = "model.visual"
    vision_blocks: str = "model.visual.blocks"
    llm_module: str = "model.language_model"
    llm_layers: str = "model.language_model.layers"
    lm_head: str = "lm_head"
    # "module:Class" of the inner model whose `get_rope_index` gives the mRoPE ids (`RopeIndex` below runs it
    # without weights, in loader workers); a string, so the spec stays picklable.
    rope_index_model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def image_factor(self) -> int:
        """Pixels per merged token edge: patch_size x spatial merge 2 (28 or 32)."""
        return self.patch_size * 2

    def llm_lora_regex(self) -> str:
        return rf"^{self.llm_layers}\.\d+\.({self.llm_lora_targets})$"

    def vision_lora_regex(self, include_merger: bool = False) -> str:
        block = rf"^{self.vision_blocks}\.\d+\.(attn\.qkv|attn\.proj|{self.vision_mlp})$"
        if not include_merger:
            return block
        mergers = "|".join(m.replace(".", r"\.") for m in self.merger_modules)
        return rf"{block}|^({mergers})(\.\d+)?\..*(linear_fc\d|mlp\.\d+)$"


_QWEN3_MLP = r"mlp\.linear_fc(1|2)"
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

FAMILIES: dict[str, FamilySpec] = {
    "qwen2_vl": FamilySpec("qwen2_vl", vision_mlp=r"mlp\.fc(1|2)",
                           rope_index_model="transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLModel"),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", vision_mlp=r"mlp\.(gate|up|down)_proj", window_attention=True,
                             rope_index_model="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel"),
    "qwen3_vl": FamilySpec(
        "qwen3_vl",
        rope_index_model="transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLModel",
        vision_mlp=_QWEN3_MLP, timestamped_video=True, patch_size=16,
        merger_modules=("model.visual.merger", "model.visual.deepstack_merger_list"),
    ),
    "qwen3_vl_moe": FamilySpec(
        "qwen3_vl_moe",
        rope_index_model="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeModel",
        vision_mlp=_QWEN3_MLP, timestamped_video=True, patch_size=16, moe=True,
        merger_modules=("model.visual.merger", "model.visual.deepstack_merger_list"),
        llm_lora_targets=r"self_attn\.(q|k|v|o)_proj", moe_expert_parameters=_EXPERTS,
    ),
    "qwen3_5": FamilySpec(
        "qwen3_5",
        rope_index_model="transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5Model",
        vision_mlp=_QWEN3_MLP, timestamped_video=True, patch_size=16, linear_attention=True,
        llm_lora_targets=f"{_LLM_ATTN_MLP}|{_LLM_LINEAR_ATTN}",
    ),
    "qwen3_5_moe": FamilySpec(
        "qwen3_5_moe",
        rope_index_model="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeModel",
        vision_mlp=_QWEN3_MLP, timestamped_video=True, patch_size=16, linear_attention=True,
        moe=True, moe_expert_parameters=_EXPERTS,
        llm_lora_targets=rf"self_attn\.(q|k|v|o)_proj|{_LLM_LINEAR_ATTN}|mlp\.shared_expert\.(gate|up|down)_proj",
    ),
}


def family_spec(model_or_type) -> FamilySpec:
    """The spec for a model, a config, or a `model_type` string; a clear error for anything else."""
    model_type = model_or_type
    if not isinstance(model_or_type, str):
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported Qwen-VL family; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """`model.get_submodule(path)` that sees through a peft wrapper: a PeftModel or its inner tuner (LoraModel)."""
    base = model
    if hasattr(model, "peft_config"):
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, PeftModel):
            base = model.base_model.model
        elif isinstance(model, BaseTuner):  # its `base_model` would be the transformers model's inner model
            base = model.model
    return base.get_submodule(path)


class RopeIndex:
    """The family's own `get_rope_index`, callable without the model's weights (in loader workers).

    The inner model class is the one the family table names (`FamilySpec.rope_index_model`). Its
    `get_rope_index` only reads `self.config` and calls other plain methods of the class, so it runs on
    an empty instance of that class carrying the config. Pickles as (config, class reference).
    """

    def __init__(self, model_or_config):
        config = getattr(model_or_config, "config", model_or_config)
        self.config = config
        self.class_path = family_spec(config).rope_index_model
        self._inner = None

    def _inner_model(self):
        if self._inner is None:
            module_name, _, class_name = self.class_path.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            inner = object.__new__(cls)  # no weights: get_rope_index needs only the config
            inner.__dict__["config"] = self.config
            self._inner = inner
        return self._inner

    def __getstate__(self):
        return {"config": self.config, "class_path": self.class_path, "_inner": None}

    def __call__(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, n) mRoPE ids of one example (input_ids (n,), mm_token_type_ids (n,), its grids)."""
        kwargs = {k: example[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in example}
        position_ids, _ = self._inner_model().get_rope_index(
            example["input_ids"][None], example["mm_token_type_ids"][None], attention_mask=None, **kwargs
        )
        return position_ids[:, 0]
