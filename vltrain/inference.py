"""Load what a recipe exported, for inference: the model, its processor, and the media / prompt settings it was
trained with (read from the export's `vltrain_config.yaml`), so that serving and batch inference see images and
videos exactly as training did.

    trained = load_trained("outputs/demo/final")                      # a full export
    trained = load_trained("outputs/demo")                            # a run folder: its final/ export
    trained = load_trained("outputs/lora_run/final", bits=4)          # base + adapter/, base in 4-bit
    replies = generate(trained.model, trained.processor, prompts, settings, **trained.generate_kwargs())

Which weights: a folder with `config.json` is a full model; a folder with `adapter/` (or `adapter_config.json`)
is a peft adapter on its base (`base=` or the adapter's recorded base model), except that an export's `merged/`
folder (lora.merge_on_export) is used when there is one and neither `base` nor `bits` asks otherwise. `bits`
4 or 8 loads the LLM's linear layers through bitsandbytes (the vision tower and LM head stay in `dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from vltrain.data.media import MediaOptions


@dataclass
class TrainedModel:
    model: torch.nn.Module
    processor: object
    media: MediaOptions  # the training run's data.* pixel limits and frame sampling
    system_prompt: str | None  # the training run's data.system_prompt (builtin: names resolved)
    image_folder: str | None  # the training run's data.image_folder (relative media paths)
    weights: Path  # the folder the weights came from (the adapter folder for an adapter)
    config: dict = field(default_factory=dict)  # the training run's resolved config (empty when none was saved)

    def generate_kwargs(self) -> dict:
        """The keyword arguments `vltrain.generation.generate` takes from the training run."""
        return {"media": self.media, "image_folder": self.image_folder, "system_prompt": self.system_prompt}


def _export_folder(path: Path) -> Path:
    """`path` itself, or the `final/` export of a run folder."""
    if not path.exists():
        raise ValueError(f"--model {str(path)!r}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r} is a file; give an exported model folder (recipes write OUTPUT_DIR/final)")
    if not (path / "config.json").is_file() and not (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
        if (path / "final").is_dir():
            return _export_folder(path / "final")
        raise ValueError(f"--model {str(path)!r} holds no model: expected config.json (a full export), adapter/ or "
                         "adapter_config.json (a LoRA export), or a run folder with final/")
    return path


def training_config(folder: Path) -> dict:
    """The resolved config a recipe saved next to the weights (`vltrain_config.yaml`), or {}."""
    for candidate in (folder / "vltrain_config.yaml", folder / "adapter" / "vltrain_config.yaml",
                      folder.parent / "vltrain_config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _adapter_dir(folder: Path) -> Path | None:
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    return None


def load_trained(path, *, base: str | None = None, bits: int = 16, dtype: str | None = None,
                 device: str | torch.device | None = None) -> TrainedModel:
    """The exported model at `path` in eval mode on `device` (default: cuda when available), with its training
    settings; see the module docstring. `dtype` defaults to the training dtype (float32 on CPU)."""
    import json

    from vltrain.config import DataConfig, LoraConfig, ModelConfig, from_dict
    from vltrain.data.template import resolve_system_prompt
    from vltrain.families import family_spec
    from vltrain.lora import load_adapter_strict, load_model_for_lora

    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = _export_folder(Path(path).expanduser())
    trained = training_config(folder)
    dtype = dtype or (trained.get("model") or {}).get("dtype", "bfloat16")
    if device.type == "cpu" and dtype != "float32":
        dtype = "float32"  # bf16 matmuls on CPU are slow and what a CPU user wants is an answer
    adapter = _adapter_dir(folder)
    if adapter is not None and (folder / "merged" / "config.json").is_file() and base is None and bits == 16:
        folder, adapter = folder / "merged", None
    if adapter is None:
        weights_name = str(folder)
    else:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        weights_name = base or (trained.get("model") or {}).get("name_or_path") or recorded
        if not weights_name:
            raise ValueError(f"{adapter} names no base model: pass --base")
    model_cfg = ModelConfig(name_or_path=weights_name, dtype=dtype, attn_implementation="sdpa",
                            trust_remote_code=bool((trained.get("model") or {}).get("trust_remote_code", False)))
    model, processor = load_model_for_lora(model_cfg, LoraConfig(enabled=bits != 16, bits=bits), device=device)
    if adapter is not None:
        model = load_adapter_strict(model, adapter)
        from transformers import AutoProcessor

        if (adapter / "tokenizer_config.json").is_file():
            processor = AutoProcessor.from_pretrained(str(adapter), trust_remote_code=model_cfg.trust_remote_code)
    if bits == 16:
        model.to(device)
    model.eval()
    data_cfg = from_dict(DataConfig, {**(trained.get("data") or {}), "train_path": "", "eval_path": None}, "data")
    media = MediaOptions.from_config(data_cfg, image_factor=family_spec(model).image_factor)
    return TrainedModel(model, processor, media, resolve_system_prompt(data_cfg.system_prompt), data_cfg.image_folder,
                        adapter or folder, trained)
