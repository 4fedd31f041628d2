import pytest
import torch

from vltrain.config import OptimConfig, TrainableConfig
from vltrain.families import family_spec
from vltrain.models import enable_gradient_checkpointing
from vltrain.optim import build_optimizer, lr_lambda
from vltrain.tiny import build_tiny
from vltrain.trainable import configure_trainable, param_component, param_groups
from vltrain.vision import dummy_vision_inputs

from conftest import FAMILIES


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_freeze_flags_and_topk(model_type):
    model, _ = build_tiny(model_type)
    spec = family_spec(model)
    configure_trainable(model, TrainableConfig(freeze_vision_tower=True, freeze_llm=True))
    names = _trainable(model)
    assert names and all(param_component(n, spec) == "merger" for n in names)

    model, _ = build_tiny(model_type)
    configure_trainable(model, TrainableConfig(freeze_vision_tower=True, freeze_merger=True, freeze_llm=True,
                                               unfreeze_topk_llm=1, unfreeze_topk_vision=1))
    names = _trainable(model)
    assert names and all(".layers.1." in n or ".blocks.1." in n for n in names)
    assert any(".layers.1." in n for n in names) and any(".blocks.1." in n for n in names)

    with pytest.raises(ValueError, match="freeze every parameter"):
        configure_trainable(build_tiny(model_type)[0], TrainableConfig(True, True, True))
    with pytest.raises(ValueError, match="unfreeze_topk_llm=9"):
        configure_trainable(build_tiny(model_type)[0], TrainableConfig(freeze_llm=True, unfreeze_topk_llm=9))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_param_groups_lrs_and_no_decay(model_type):
    model, _ = build_tiny(model_type)
    cfg = OptimConfig(lr=1e-4, vision_lr=1e-5, merger_lr=3e-5, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {g["lr"] for n, g in groups.items() if n.startswith("vision")} == {1e-5}
    assert {g["lr"] for n, g in groups.items() if n.startswith("merger")} == {3e-5}
    assert {g["lr"] for n, g in groups.items() if n.startswith("llm")} == {1e-4}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for n, g in groups.items() if n.endswith("no_decay") for p in g["params"]}
    decay = {names[id(p)] for n, g in groups.items() if not n.endswith("no_decay") for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 for n, g in groups.items() if n.endswith("no_decay"))
    assert "model.language_model.embed_tokens.weight" in no_decay
    assert any(n.endswith("norm.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert all(not n.endswith((".bias", "norm.weight")) for n in decay)
    assert "lm_head.weight" in decay
    assert len(no_decay) + len(decay) == len(list(model.parameters()))
    # the optimizer keeps the groups (names and lrs) as built
    optimizer = build_optimizer(model, cfg)
    assert sorted(g["name"] for g in optimizer.param_groups) == sorted(groups)


def test_schedule_shapes():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_lambda(0, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_lambda(9, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_lambda(60, kind="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(60, kind="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, kind="linear", **kw) == pytest.approx(0.1)
    assert lr_lambda(80, kind="constant", **kw) == 1.0


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_gradient_checkpointing_gives_vision_blocks_real_gradients(model_type):
    model, _ = build_tiny(model_type)
    enable_gradient_checkpointing(model)
    model.train()
    assert model.model.visual.gradient_checkpointing and model.model.language_model.gradient_checkpointing
    pixels, grid = dummy_vision_inputs(model)
    out = model.model.visual(pixels + torch.randn_like(pixels), grid_thw=grid)
    out.pooler_output.pow(2).sum().backward()
    block_grads = [p.grad for p in model.model.visual.blocks.parameters()]
    assert all(g is not None for g in block_grads)
    assert sum(g.abs().sum() for g in block_grads) > 0


def test_checkpoint_every_n_layers():
    model, _ = build_tiny("qwen2_5_vl")
    enable_gradient_checkpointing(model, every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in model.model.language_model.layers]
    assert flags == [True, False]
    with pytest.raises(ValueError, match="checkpoint_every_n_layers"):
        enable_gradient_checkpointing(build_tiny("qwen2_vl")[0], every_n_layers=0)


def test_checkpoint_every_n_layers_needs_gradient_checkpointing():
    from vltrain.config import ModelConfig

    with pytest.raises(ValueError, match="checkpoint_every_n_layers is set but model.gradient_checkpointing is false"):
        ModelConfig(checkpoint_every_n_layers=2).validate()
    ModelConfig(gradient_checkpointing=True, checkpoint_every_n_layers=2).validate()
