"""Gradient checkpointing variants: same gradients as no checkpointing, and each variant recomputes what it says."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vltrain.config import ModelConfig
from vltrain.models import enable_gradient_checkpointing, llm_decoder_layers
from vltrain.tiny import build_tiny
from tests.test_kernels import image_batch

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class CountOps(TorchDispatchMode):
    """Matmuls and attention forwards dispatched while active."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.matmuls += name in MATMULS
        self.attention += "attention" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


def _grads_and_backward_ops(model_type, vision_checkpointed=True, **gc):
    torch.manual_seed(0)
    model, processor = build_tiny(model_type, dtype=torch.float32)
    if gc:
        enable_gradient_checkpointing(model, **gc)
        for block in model.model.visual.blocks:
            block.gradient_checkpointing = vision_checkpointed
    model.train()
    loss = model(**image_batch(processor)).loss
    with CountOps() as counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, (counter.matmuls, counter.attention)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_checkpoint_variants_same_gradients_less_recompute(model_type):
    ref, plain = _grads_and_backward_ops(model_type)
    full, ops_full = _grads_and_backward_ops(model_type, policy="full")
    sac, ops_sac = _grads_and_backward_ops(model_type, policy="save_matmuls")
    skip, ops_skip = _grads_and_backward_ops(model_type, skip_last_layers=1)
    for grads in (full, sac, skip):
        assert grads.keys() == ref.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # full checkpointing reruns the forward matmuls and attention of every layer in the backward; skipping
    # the last LLM layer reruns fewer; save_matmuls reruns none in the LLM layers (vision blocks, which it
    # leaves to full recompute, taken out of the count)
    assert ops_full[0] > ops_skip[0] > plain[0] and ops_full[1] > ops_skip[1] > plain[1] == 0
    _, llm_full = _grads_and_backward_ops(model_type, vision_checkpointed=False, policy="full")
    _, llm_sac = _grads_and_backward_ops(model_type, vision_checkpointed=False, policy="save_matmuls")
    assert llm_full[0] > plain[0] and llm_full[1] > 0
    assert llm_sac == plain


def test_skip_last_layers_flags_and_peft():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny("qwen2_5_vl")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    log = enable_gradient_checkpointing(model, skip_last_layers=1, policy="save_matmuls")
    assert [layer.gradient_checkpointing for layer in llm_decoder_layers(model)] == [True, False]
    assert all(b.gradient_checkpointing for b in model.get_base_model().model.visual.blocks)
    assert "save_matmuls" in log[1] and "last 1 of 2" in log[2]
    with pytest.raises(ValueError, match="checkpoint_skip_last_layers"):
        enable_gradient_checkpointing(build_tiny("qwen2_vl")[0], skip_last_layers=3)
    with pytest.raises(ValueError, match="checkpoint_policy"):
        enable_gradient_checkpointing(build_tiny("qwen2_vl")[0], policy="most")


@pytest.mark.parametrize("field,value", [("checkpoint_policy", "save_matmuls"), ("checkpoint_skip_last_layers", 2),
                                         ("checkpoint_every_n_layers", 2)])
def test_checkpoint_options_need_gradient_checkpointing(field, value):
    cfg = ModelConfig(**{field: value})
    with pytest.raises(ValueError, match=f"model.{field} is set but model.gradient_checkpointing is false"):
        cfg.validate()
    ModelConfig(gradient_checkpointing=True, **{field: value}).validate()


def test_recipe_with_selective_checkpointing_trains_like_no_checkpointing(tmp_path, mixed_data):
    """The recipe wires the options through; checkpointing changes memory, never the numbers."""
    from conftest import sft_config
    from recipes.sft import main

    common = {"train.max_steps": 3, "data.packing": "true", "model.kernels": "[all]"}
    plain = main(sft_config(tmp_path / "plain", "qwen2_5_vl", mixed_data, **common))
    sac = main(sft_config(tmp_path / "sac", "qwen2_5_vl", mixed_data, **common, **{
        "model.gradient_checkpointing": "true", "model.checkpoint_policy": "save_matmuls",
        "model.checkpoint_skip_last_layers": 1}))
    assert sac["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert sac["losses"][-1] < sac["losses"][0]
