"""The one build path (vltrain.build) and the reference model of the preference / RL loops."""

import copy
import json
import socket
import subprocess
import sys

import pytest
import torch

from vltrain.build import build_model, build_reference
from vltrain.config import LoraConfig, ModelConfig, TrainableConfig
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.distributed import build_accelerator
from vltrain.progress import model_inputs

from vltrain.tiny import build_tiny

from conftest import REPO, sft_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(processor, data, media_dir):
    media = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    return PadCollator(processor.tokenizer.pad_token_id)([ds[1], ds[2]])  # image + multi-image samples


def _logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(batch, labels=False)).logits


def _train_steps(model, batch, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**model_inputs(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_build_model_reports_each_stage_in_order():
    built = build_model(ModelConfig(name_or_path="tiny:qwen2_5_vl", dtype="float32", attn_implementation="sdpa",
                                    gradient_checkpointing=True, kernels=["patch_embed_linear"]),
                        TrainableConfig(freeze_llm=True, freeze_vision_tower=True), LoraConfig(enabled=True, rank=4, alpha=8),
                        packing=True)
    text = "\n".join(built.report)
    order = [text.index(key) for key in ("model: tiny:qwen2_5_vl", "packed attention", "kernels: patch_embed_linear",
                                         "LoRA rank 4", "gradient checkpointing", "parameters:")]
    assert order == sorted(order), built.report
    assert hasattr(built.model, "peft_config") and built.spec.model_type == "qwen2_5_vl"
    assert built.model.config.text_config._attn_implementation == "vltrain_varlen"
    assert built.trainable["llm"] > 0 and built.trainable["vision"] == 0  # adapters only; frozen tower
    assert built.model.base_model.model.is_gradient_checkpointing


def test_frozen_copy_reference_stays_the_starting_policy(tmp_path, mixed_data, media_dir):
    cfg = sft_config(tmp_path, "qwen2_5_vl", mixed_data, **{"model.kernels": "[patch_embed_linear]"})
    built = build_model(cfg.model, cfg.trainable, cfg.lora)
    accelerator = build_accelerator(cfg.train)
    policy = built.model
    reference = build_reference(policy)
    frozen = reference.module
    reference.prepare(accelerator)
    assert frozen is not policy and not reference.adapters_off and reference.module is frozen  # single process
    assert not any(p.requires_grad for p in frozen.parameters())
    assert {p.dtype for p in frozen.parameters()} == {p.dtype for p in policy.parameters()}
    assert frozen._vltrain_kernels == policy._vltrain_kernels  # same instance kernels, rebound to the copy
    assert frozen.model.visual.patch_embed.forward.__self__ is frozen.model.visual.patch_embed
    assert policy not in accelerator._models and frozen not in accelerator._models  # never checkpointed

    batch = _batch(built.processor, mixed_data, media_dir)
    start = _logits(policy, batch)
    with reference() as model:
        torch.testing.assert_close(_logits(model, batch), start)
    _train_steps(policy, batch)
    assert not torch.allclose(_logits(policy, batch), start, atol=1e-3)  # the policy moved ...
    with reference() as model:
        assert not model.training
        torch.testing.assert_close(_logits(model, batch), start)  # ... the reference did not
    assert policy.training  # and the policy's mode is untouched


def test_lora_reference_is_the_policy_with_adapters_off(tmp_path, mixed_data, media_dir):
    """No second copy; with adapters off the model is exactly the base, fully trained merger included
    (peft runs the original copy of each modules_to_save module)."""
    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{
        "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.1,
        "trainable.freeze_llm": True, "trainable.freeze_vision_tower": True, "trainable.freeze_merger": False})
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.trainable, cfg.lora, lora_reference=True)
    base = copy.deepcopy(built.model.base_model.model)  # LoRA B = 0: the base model's function
    accelerator = build_accelerator(cfg.train)
    reference = build_reference(built.model).prepare(accelerator, built.model)
    assert reference.adapters_off and reference.module is built.model

    batch = _batch(built.processor, mixed_data, media_dir)
    base.eval()
    expected = _logits(base, batch)
    built.model.train()
    _train_steps(built.model, batch)
    assert not torch.allclose(_logits(built.model, batch), expected, atol=1e-3)
    with reference() as model:
        torch.testing.assert_close(_logits(model, batch), expected)
    assert built.model.training
    built.model.eval()
    assert not torch.allclose(_logits(built.model, batch), expected, atol=1e-3)  # adapters back on after the context


def test_build_accelerator_uses_the_accumulation_of_the_config(tmp_path, mixed_data):
    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{"train.gradient_accumulation_steps": 3})
    assert build_accelerator(cfg.train).gradient_accumulation_steps == 3


@pytest.mark.parametrize("backend, nproc", [
    ("ddp", 2), ("zero3", 2), pytest.param("fsdp2", 1, marks=pytest.mark.gpu)])
def test_frozen_reference_is_placed_like_the_policy(backend, nproc, tmp_path, mixed_data):
    """Copied before prepare, placed like the policy (ZeRO-3 / FSDP2: sharded), never registered for
    checkpoints: it equals the starting policy on every rank and stays put while the policy trains."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    torch.manual_seed(0)
    model, processor = build_tiny("qwen2_5_vl")
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "ref"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(REPO / "tests" / "dist_reference.py"), backend, str(tmp_path / "tiny"),
           str(mixed_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    for rank in range(nproc):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["world"] == nproc
        assert record["ref_matches_start"] < 1e-5 and record["ref_changed"] == 0.0
        assert record["policy_moved"] > 1e-3
        assert record["ref_trainable"] == 0 and record["models_registered"] == 1
        assert record["ref_partitioned"] == (backend in ("zero3", "fsdp2"))
        wrapper = {"zero3": "DeepSpeedEngine", "fsdp2": "FSDPQwen2_5_VLForConditionalGeneration"}
        assert record["ref_wrapper"] == wrapper.get(backend, "Qwen2_5_VLForConditionalGeneration")


def test_lora_without_a_reference_drops_peft_frozen_copies_and_trains_the_same(tmp_path, mixed_data, media_dir):
    """A fully trained vision tower beside LLM adapters: peft keeps a frozen copy of it, used only with the adapters
    off (a LoRA reference). Without a reference (SFT, classification) the copy is dropped: the tower's size is freed,
    training is unchanged, and switching the adapters off fails loudly instead of running trained weights."""
    from vltrain.lora import DroppedCopy

    cfg = sft_config(tmp_path, "qwen2_5_vl", mixed_data, **{
        "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0, "trainable.freeze_llm": True})
    torch.manual_seed(0)
    kept = build_model(cfg.model, cfg.trainable, cfg.lora, lora_reference=True)
    torch.manual_seed(0)
    dropped = build_model(cfg.model, cfg.trainable, cfg.lora)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vision = sum(p.numel() for p in kept.model.base_model.model.model.visual.original_module.parameters())
    assert vision > 0 and count(kept.model) - count(dropped.model) == vision
    assert isinstance(dropped.model.base_model.model.model.visual.original_module, DroppedCopy)
    assert kept.trainable == dropped.trainable

    batch = _batch(kept.processor, mixed_data, media_dir)
    torch.testing.assert_close(_logits(dropped.model, batch), _logits(kept.model, batch))
    _train_steps(kept.model, batch)
    _train_steps(dropped.model, batch)
    torch.testing.assert_close(_logits(dropped.model, batch), _logits(kept.model, batch))
    with pytest.raises(ValueError, match="lora_reference=True"):
        build_reference(dropped.model)
    with dropped.model.disable_adapter(), pytest.raises((RuntimeError, AttributeError),
                                                        match="frozen copy of .*visual.* was dropped"):
        _logits(dropped.model, batch)
