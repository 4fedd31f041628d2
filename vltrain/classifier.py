"""A classification head on a Qwen-VL model: the backbone's last hidden state at each example's last real token,
through a linear layer or a 2-layer MLP, to `num_labels` scores. The LM head never runs (no vocab logits).

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=..., allow_frozen=True)  # the backbone, as SFT builds it
    model = VLClassifier(built.model, HeadSpec.from_config(cfg.cls))     # the head trains fully, never gets adapters
    logits = model(**batch)                                              # (N, num_labels) float32, N = examples in batch
    export_model(accelerator, model, processor, cfg, out_dir)            # backbone as usual + head.safetensors + classifier.json
    model, processor = load_classifier(out_dir)                          # the one call that reloads it for inference

Pooling (`last_token_positions`): a padded batch pools at each row's last position with attention_mask 1 (right or
left padding); a packed row (vltrain.data.packing: position_ids row 0 restarts at 0 per example) pools at the last
token of every example, so a packed row of N examples gives N scores.

The backbone is called through its inner vision-language model (`model.model` of the ForConditionalGeneration
class: vision tower, merger, language model), so the LM head is neither run nor trained (it is frozen here unless it
shares its weight with the input embeddings). With LoRA the backbone is the peft model and the head sits outside it.
A batch without images or videos gets a dummy one (vltrain.vision.complete_modalities), as in the other loops, so
every rank runs the same modules; the pooled positions are taken before it is appended.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vltrain.families import get_module
from vltrain.progress import model_inputs
from vltrain.vision import complete_modalities, link_dummy_features

HEAD_FILE, SPEC_FILE = "head.safetensors", "classifier.json"


@dataclass(frozen=True)
class HeadSpec:
    num_labels: int
    problem_type: str = "single_label"  # single_label | multi_label | regression
    mlp_head_dim: int = 0  # 0: one linear layer; > 0: Linear(hidden, dim) -> GELU -> Dropout -> Linear(dim, num_labels)
    mlp_head_dropout: float = 0.0
    classes: tuple[str, ...] | None = None  # class names by id (None: the ids are the names)

    @classmethod
    def from_config(cls, cls_cfg) -> "HeadSpec":
        return cls(num_labels=cls_cfg.num_labels, problem_type=cls_cfg.problem_type, mlp_head_dim=cls_cfg.mlp_head_dim,
                   mlp_head_dropout=cls_cfg.mlp_head_dropout, classes=tuple(cls_cfg.classes) if cls_cfg.classes else None)


def build_head(hidden_size: int, spec: HeadSpec) -> nn.Module:
    if not spec.mlp_head_dim:
        return nn.Linear(hidden_size, spec.num_labels)
    return nn.Sequential(nn.Linear(hidden_size, spec.mlp_head_dim), nn.GELU(), nn.Dropout(spec.mlp_head_dropout),
                         nn.Linear(spec.mlp_head_dim, spec.num_labels))


def last_token_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the token each example is scored at: (N,) each, examples in batch order."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None and batch.get("position_ids") is not None:  # packed: examples start where text position is 0
        text_pos = batch["position_ids"][0]  # (B, L)
        rows, starts = (text_pos == 0).nonzero(as_tuple=True)
        ends = torch.empty_like(starts)
        ends[:-1] = starts[1:] - 1
        ends[-1] = ids.shape[1] - 1
        new_row = rows[1:] != rows[:-1]  # an example that is the last of its row ends at the row's end
        ends[:-1][new_row] = ids.shape[1] - 1
        return rows, ends
    if mask is None:
        return torch.arange(ids.shape[0], device=ids.device), torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    # the last position whose mask is 1: right padding (ones then zeros) and left padding (zeros then ones) alike
    last = mask.shape[1] - 1 - mask.flip(-1).to(torch.long).argmax(-1)
    return torch.arange(mask.shape[0], device=mask.device), last


class VLClassifier(nn.Module):
    """`backbone` (a Qwen-VL ForConditionalGeneration, or its peft wrapper) + a head; forward(**batch) -> (N, C) fp32."""

    def __init__(self, backbone: nn.Module, spec: HeadSpec):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        self.config = backbone.config  # vltrain.families reads the family from it
        lm_head = get_module(backbone, "lm_head")
        if lm_head.weight is not backbone.get_input_embeddings().weight:
            lm_head.requires_grad_(False)  # never run: DDP would wait for its gradients
        self.head = build_head(backbone.config.get_text_config().hidden_size, spec).to(lm_head.weight.dtype)

    @property
    def inner(self) -> nn.Module:
        """The vision-language model under the LM head (vision tower, merger, language model)."""
        return get_module(self.backbone, "model")

    def forward(self, **batch) -> torch.Tensor:
        rows, cols = last_token_positions(batch)
        backbone = self.backbone
        batch, added = complete_modalities(backbone, batch)
        with link_dummy_features(backbone) if added else nullcontext():
            hidden = self.inner(**model_inputs(batch, labels=False)).last_hidden_state
        pooled = hidden[rows, cols]
        return self.head(pooled.to(self.head_dtype)).float()

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def split_state_dict(self, state_dict: dict) -> tuple[nn.Module, dict, dict]:
        """(the backbone, its state dict, the head's): how vltrain.checkpoint.export_model saves this model."""
        backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        return self.backbone, backbone, head

    def save_head(self, out_dir: Path, head_state: dict, **info) -> None:
        """head.safetensors and classifier.json (the spec, the hidden size, `info` such as the prompt) in `out_dir`."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in head_state.items()}, str(out_dir / HEAD_FILE))
        spec = {**asdict(self.spec), "classes": list(self.spec.classes) if self.spec.classes else None,
                "hidden_size": self.config.get_text_config().hidden_size, **info}
        (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def load_classifier(path: str | Path, *, dtype: str | None = None, device: str | torch.device = "cpu"):
    """(VLClassifier in eval mode, processor) from an export of recipes/cls.py: a full backbone in `path`, the merged
    model in `path/merged` (lora.merge_on_export), or a LoRA adapter in `path/adapter` (merged here into its base,
    loaded as at training time), plus the head."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / SPEC_FILE).is_file():
        raise ValueError(f"{path}: no {SPEC_FILE}; not a classifier exported by recipes/cls.py")
    info = json.loads((path / SPEC_FILE).read_text())
    spec = HeadSpec(num_labels=info["num_labels"], problem_type=info["problem_type"], mlp_head_dim=info["mlp_head_dim"],
                    mlp_head_dropout=info["mlp_head_dropout"], classes=tuple(info["classes"]) if info["classes"] else None)
    from vltrain.config import ModelConfig
    from vltrain.models import load_model

    recorded = dtype or info.get("dtype") or "float32"
    if (path / "adapter").is_dir() and not (path / "merged").is_dir():
        from vltrain.lora import merge_adapter

        backbone, processor = merge_adapter(path / "adapter", base=info.get("base"), dtype=dtype)
    else:  # a full export, or the merged model lora.merge_on_export wrote beside the adapter
        folder = path / "merged" if (path / "merged").is_dir() else path
        backbone, processor = load_model(ModelConfig(name_or_path=str(folder), dtype=recorded, attn_implementation="sdpa"))
    model = VLClassifier(backbone, spec)
    model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    return model.to(device).eval(), processor
