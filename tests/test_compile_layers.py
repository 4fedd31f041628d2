"""kernels "compile_layers": each LLM decoder layer torch.compile'd on one instance, same numbers as eager."""

import copy

import pytest
import torch

from vltrain.kernels import applicable_kernels, apply_kernels
from vltrain.tiny import build_tiny

from conftest import sft_config


def test_compile_layers_is_opt_in_instance_only_and_idempotent():
    model, _ = build_tiny("qwen2_5_vl")
    other = copy.deepcopy(model)
    assert "compile_layers" in applicable_kernels(model)
    assert "compile_layers" not in " ".join(apply_kernels(copy.deepcopy(model), ["all"]))
    first = apply_kernels(model, ["compile_layers"])
    assert first == apply_kernels(model, ["compile_layers"]) and "2 layers" in first[0]
    assert all("_vltrain_compiled" in vars(layer) for layer in model.model.language_model.layers)
    assert not any("_vltrain_compiled" in vars(layer) for layer in other.model.language_model.layers)
    assert not any("_vltrain_compiled" in vars(block) for block in model.model.visual.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_5"])
def test_recipe_with_compiled_layers_trains_like_eager(tmp_path, mixed_data, model_type):
    """Packed rows of changing length (dynamic shapes), checkpointing, every kernel: losses as eager.
    Qwen3.5 covers the linear-attention layers that run per example, eager, inside the compiled layer."""
    from recipes.sft import main

    common = {"train.max_steps": 3, "data.packing": "true", "model.gradient_checkpointing": "true"}
    eager = main(sft_config(tmp_path / "eager", model_type, mixed_data, **common, **{"model.kernels": "[all]"}))
    torch._dynamo.reset()
    compiled = main(sft_config(tmp_path / "compiled", model_type, mixed_data, **common,
                               **{"model.kernels": "[all,compile_layers]"}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert compiled["losses"][-1] < compiled["losses"][0]


def test_recipe_refuses_compile_layers_with_sharded_parameters(tmp_path, mixed_data, monkeypatch):
    import recipes.sft as recipe

    monkeypatch.setattr("vltrain.distributed.parameters_sharded", lambda accelerator: True)
    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{"model.kernels": "[compile_layers]"})
    with pytest.raises(ValueError, match="compile_layers is not supported under ZeRO-3/FSDP"):
        recipe.main(cfg)


@pytest.mark.gpu
def test_compiled_layers_on_gpu_bf16_match_eager(tmp_path, mixed_data):
    """bf16 on CUDA, liger kernels inside the compiled function: losses within 2% of eager (bf16 rounding
    differs once inductor fuses the elementwise ops)."""
    from recipes.sft import main

    common = {"train.max_steps": 4, "data.packing": "true", "model.gradient_checkpointing": "true",
              "model.dtype": "bfloat16"}
    eager = main(sft_config(tmp_path / "eager", "qwen2_5_vl", mixed_data, **common, **{"model.kernels": "[all]"}))
    compiled = main(sft_config(tmp_path / "compiled", "qwen2_5_vl", mixed_data, **common,
                               **{"model.kernels": "[all,compile_layers]"}))
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=2e-2)
    assert compiled["losses"][-1] < compiled["losses"][0]
