"""LoRA / DoRA / QLoRA on tiny models: the intended parameters (and only those) train; merge and export."""

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from torch.utils.data import DataLoader

from vltrain.config import LoraConfig, SFTConfig, TrainableConfig, load_config
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.lora import apply_lora, load_adapter_strict, merge_adapter
from vltrain.progress import model_inputs
from vltrain.trainable import configure_trainable
from vltrain.tiny import build_tiny

from conftest import FAMILIES, REPO, write_image

sys.path.insert(0, str(REPO))


def _records(n=4):
    return [
        {"id": f"s{i}", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": ["red", "green", "blue", "yellow"][i % 4]}]}
        for i in range(n)
    ]


@pytest.fixture
def image_data(tmp_path) -> Path:
    write_image(tmp_path / "a.png", (56, 56), seed=3)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_records(8)))
    return path


def lora_cfg(tmp_path, model_type, data, **overrides):
    base = {
        "model.name_or_path": f"tiny:{model_type}", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(data), "data.image_folder": str(Path(data).parent), "data.num_workers": 0,
        "data.max_seq_length": 512, "data.image_max_pixels": 64 * 64 * 2,
        "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.scheduler": "constant",
        "train.output_dir": str(tmp_path / "out"), "train.report_to": "none", "train.max_steps": 4,
        "train.micro_batch_size": 2, "train.log_every": 1,
        "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0,
        "trainable.freeze_llm": True, "trainable.freeze_vision_tower": True, "trainable.freeze_merger": True,
    }
    base.update(overrides)
    if str(base["lora.enabled"]).lower() == "false":  # a full fine-tune: no adapter options (they would be orphans)
        base = {k: v for k, v in base.items() if not k.startswith("lora.") or k == "lora.enabled" or k in overrides}
    return load_config(SFTConfig, None, [f"{k}={v}" for k, v in base.items()])


def _reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _train_steps(model, processor, data, num_steps=2):
    spec = family_spec(model)
    ds = SFTDataset(str(data), processor, MediaOptions(image_factor=spec.image_factor, image_max_pixels=64 * 64 * 2),
                    max_seq_length=512, image_folder=str(Path(data).parent))
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=PadCollator(processor.tokenizer.pad_token_id))))
    batch = model_inputs(batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(num_steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


VARIANTS = {  # DoRA rides on the vision-LoRA run to keep the suite fast: one run checks both
    "lora": dict(),
    "dora_vision_lora": dict(use_dora=True, vision_lora=True, vision_lora_merger=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_only_intended_parameters_train(model_type, variant, image_data):
    model, processor = build_tiny(model_type)
    configure_trainable(model, TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True), adapters_follow=True)
    model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0, **VARIANTS[variant]))
    before = _snapshot(model)
    _train_steps(model, processor, image_data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert all("lora_" in n for n in trainable), sorted(n for n in trainable if "lora_" not in n)[:5]
    # every LLM adapter trains; in the tiny 2-layer Qwen3-VL the last DeepStack merger's output gets no
    # gradient at all (full fine-tuning too), so vision adapters are checked per block and merger
    lora_b = {n for n in trainable if "lora_B" in n and ".visual." not in n}
    assert lora_b and lora_b <= changed, f"adapters that did not train: {sorted(lora_b - changed)[:5]}"
    vision_adapters = {n for n in trainable if ".visual." in n}
    assert bool(vision_adapters) == (variant == "dora_vision_lora")
    if variant == "dora_vision_lora":
        assert any("blocks.0." in n for n in vision_adapters & changed)
        assert any(".merger." in n for n in vision_adapters & changed)
    if variant == "dora_vision_lora":
        assert any("lora_magnitude_vector" in n for n in changed)


def test_moe_expert_adapters_train():
    model, _ = build_tiny("qwen3_vl_moe")
    configure_trainable(model, TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True), adapters_follow=True)
    model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0, moe_experts=True))
    expert = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n]
    assert expert, "no adapters on the fused expert weights"
    before = _snapshot(model)
    ids = torch.randint(0, 400, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in expert)


def test_target_selection_options():
    model, _ = build_tiny("qwen2_5_vl")
    configure_trainable(model, TrainableConfig(freeze_llm=True, freeze_vision_tower=True), adapters_follow=True)
    from vltrain.lora import lora_target_modules

    all_targets = lora_target_modules(model, LoraConfig(enabled=True))
    assert len(all_targets) == 2 * 7 and all(".language_model." in t for t in all_targets)
    assert lora_target_modules(model, LoraConfig(enabled=True, num_lora_modules=3)) == all_targets[-3:]
    no_mlp = lora_target_modules(model, LoraConfig(enabled=True, namespan_exclude=["mlp"]))
    assert len(no_mlp) == 8 and not any("mlp" in t for t in no_mlp)
    vision = lora_target_modules(model, LoraConfig(enabled=True, vision_lora=True))
    assert len(vision) == len(all_targets) + 2 * 5  # qkv, proj, gate/up/down per vision block


def test_fully_trained_modules_sit_next_to_adapters(image_data):
    model, processor = build_tiny("qwen2_vl")
    configure_trainable(model, TrainableConfig(freeze_llm=True, unfreeze_topk_llm=1), adapters_follow=True)
    model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # the vision tower, the merger and the top LLM layer train fully; adapters only on layer 0
    assert any("visual.modules_to_save" in n for n in trainable)
    assert any("language_model.layers.1." in n and "modules_to_save" in n for n in trainable)
    assert not any("language_model.layers.1." in n and "lora_" in n for n in trainable)
    assert any("language_model.layers.0." in n and "lora_" in n for n in trainable)
    _train_steps(model, processor, image_data, num_steps=1)


@pytest.mark.parametrize("bad, message", [
    ({"trainable.freeze_llm": False}, "trainable.freeze_llm"),
    ({"lora.vision_lora": True, "trainable.freeze_vision_tower": False}, "freeze_vision_tower"),
    ({"lora.moe_experts": True, "lora.dropout": 0.1}, "lora.dropout"),
    ({"lora.enabled": False, "lora.use_dora": True}, "lora.enabled"),
])
def test_bad_combinations_name_the_field(bad, message, tmp_path, image_data):
    with pytest.raises(ValueError, match=message):
        lora_cfg(tmp_path, "qwen2_vl", image_data, **bad)  # load_config validates


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cpu(bits, tmp_path, image_data, monkeypatch):
    import bitsandbytes as bnb

    from recipes import sft as recipe

    captured = {}
    real_train = recipe.train

    def spy(accelerator, model, *args, **kwargs):
        captured["model"] = model
        captured["before"] = _snapshot(model)
        return real_train(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(recipe, "train", spy)
    cfg = lora_cfg(tmp_path, "qwen2_5_vl", image_data, **{"lora.bits": bits, "model.dtype": "bfloat16",
                                                          "train.max_steps": 3})
    summary = recipe.main(cfg)
    _reset_accelerate()
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    model = captured["model"]
    base = model.base_model.model
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(base.model.language_model.layers[0].self_attn.q_proj.base_layer, quantized)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in base.model.visual.modules())
    assert not isinstance(base.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert base.lm_head.weight.dtype == torch.bfloat16
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, captured["before"][n])}
    assert changed and all("lora_" in n for n in changed)
    assert (Path(summary["export_dir"]) / "adapter" / "adapter_model.safetensors").is_file()


def _greedy(model, processor, image_path, max_new_tokens=8):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, out[0, inputs["input_ids"].shape[1]:]


def test_merged_export_matches_base_plus_adapter_and_loads_everywhere(tmp_path, image_data):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from recipes.merge_lora import main as merge_main
    from recipes.sft import main

    cfg = lora_cfg(tmp_path, "qwen2_5_vl", image_data, **{
        "lora.merge_on_export": True, "lora.vision_lora": True, "train.max_steps": 6, "lora.dropout": 0.1,
        "trainable.unfreeze_topk_llm": 1,  # a fully trained layer next to the adapters must reach the export
    })
    summary = main(cfg)
    _reset_accelerate()
    final = Path(summary["export_dir"])
    adapter_dir, merged_dir = final / "adapter", final / "merged"
    assert (adapter_dir / "adapter_config.json").is_file() and (merged_dir / "model.safetensors").is_file()

    base, processor = build_tiny("qwen2_5_vl")  # the same seeded tiny base that was trained
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()  # plain transformers
    merged_processor = AutoProcessor.from_pretrained(str(merged_dir))
    image = image_data.parent / "a.png"
    logits_a, tokens_a = _greedy(peft_model, processor, image)
    logits_b, tokens_b = _greedy(merged, merged_processor, image)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens_a, tokens_b)
    # the merge really changed the base: adapters and the fully trained layer are in it
    fresh, _ = build_tiny("qwen2_5_vl")
    assert not torch.equal(fresh.model.language_model.layers[1].mlp.up_proj.weight,
                           merged.model.language_model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(fresh.model.language_model.layers[0].self_attn.q_proj.weight,
                           merged.model.language_model.layers[0].self_attn.q_proj.weight)

    # the merge recipe gives the same model
    out = tmp_path / "merged_cli"
    merge_main([str(adapter_dir), "--out", str(out)])
    cli = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    for (n, a), (_, b) in zip(merged.state_dict().items(), cli.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_merge_rejects_a_key_that_does_not_match(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = build_tiny("qwen2_vl")
    configure_trainable(model, TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True), adapters_follow=True)
    model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8), base_name="tiny:qwen2_vl")
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "layers.0.self_attn.q_proj.lora_A" in k)
    state[key.replace("layers.0", "layers.7")] = state.pop(key)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.q_proj"):
        merge_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A"):  # and the missing one
        load_adapter_strict(build_tiny("qwen2_vl")[0], tmp_path / "adapter")


def test_qlora_with_fused_linear_ce_matches_the_stock_loss(tmp_path, image_data, capsys):
    """QLoRA keeps lm_head unquantized, so the fused cross-entropy kernel applies under it unchanged."""
    from recipes import sft as recipe

    losses = {}
    for kernels in ("[]", "[fused_linear_ce]"):
        cfg = lora_cfg(tmp_path / kernels.strip("[]"), "qwen2_5_vl", image_data, **{
            "lora.bits": 4, "model.dtype": "bfloat16", "train.max_steps": 2, "model.kernels": kernels})
        losses[kernels] = recipe.main(cfg)["losses"]
        _reset_accelerate()
    assert "kernels: fused_linear_ce:" in capsys.readouterr().out  # really applied under 4-bit
    stock, fused = losses["[]"], losses["[fused_linear_ce]"]
    assert fused[0] == pytest.approx(stock[0], rel=2e-3)
    assert fused[1] == pytest.approx(stock[1], rel=2e-2)


def test_get_module_sees_through_a_peft_model_and_its_inner_tuner():
    """`vltrain.families.get_module` finds the same vision tower in the model, its PeftModel and the PeftModel's
    inner LoraModel (whose own `base_model` attribute is the transformers model's inner model, not the model)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from vltrain.families import get_module

    model, _ = build_tiny("qwen2_5_vl")
    tower = model.model.visual
    adapted = get_peft_model(model, PeftLoraConfig(r=4, target_modules=family_spec(model).llm_lora_regex()))
    path = family_spec(model).vision_module
    assert get_module(model, path) is tower
    assert get_module(adapted, path) is tower
    assert get_module(adapted.base_model, path) is tower
