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


def test_compile_vision_is_opt_in_and_patches_only_the_vision_blocks():
    model, _ = build_tiny("qwen2_vl")
    assert "compile_vision" in applicable_kernels(model)
    assert "compile_vision" not in " ".join(apply_kernels(copy.deepcopy(model), ["all"]))
    first = apply_kernels(model, ["compile_vision"])
    assert first == apply_kernels(model, ["compile_vision"]) and first[0].startswith("compile_vision: model.visual.blocks")
    assert all("_vltrain_compiled" in vars(block) for block in model.model.visual.blocks)
    assert not any("_vltrain_compiled" in vars(layer) for layer in model.model.language_model.layers)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_compiled_vision_blocks_give_eager_loss_and_gradients(model_type, media_dir, mixed_data):
    """A packed SFT batch (images and a video, vision_varlen's attention eager inside each compiled block),
    checkpointing on, two forwards of different lengths: loss and every gradient as eager; a graph was built."""
    from test_visual_merge import packed_batch
    from vltrain.attention import enable_packed_attention
    from vltrain.models import enable_gradient_checkpointing

    from conftest import stock_and_copy

    torch._dynamo.reset()
    eager, compiled, processor = stock_and_copy(model_type)
    for model, kernels in ((eager, ["all"]), (compiled, ["all", "compile_vision"])):
        apply_kernels(model, kernels)
        enable_packed_attention(model)
        enable_gradient_checkpointing(model)
        model.train()
    batch = packed_batch(model_type, processor, media_dir, mixed_data)
    shorter = {k: v for k, v in batch.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    for step, b in enumerate((batch, shorter)):
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(**b).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (ref_loss, ref_grads), (loss, grads) = results
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys() and any(".visual.blocks." in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{step} {name}: {m}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.gpu
def test_compiled_vision_blocks_on_gpu_bf16_train_like_eager(tmp_path, mixed_data):
    """bf16 on CUDA, the flash varlen vision attention eager between compiled graphs: losses within 2% of
    eager over 4 steps (inductor's fused elementwise ops round differently in bf16)."""
    from recipes.sft import main

    common = {"train.max_steps": 4, "data.packing": "true", "model.gradient_checkpointing": "true",
              "model.dtype": "bfloat16"}
    eager = main(sft_config(tmp_path / "eager", "qwen2_vl", mixed_data, **common, **{"model.kernels": "[all]"}))
    torch._dynamo.reset()
    compiled = main(sft_config(tmp_path / "compiled", "qwen2_vl", mixed_data, **common,
                               **{"model.kernels": "[all,compile_vision]"}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=2e-2)


@pytest.mark.slow
def test_compiled_lora_without_dropout_trains_like_eager(tmp_path, mixed_data):
    """LoRA (dropout 0, so that eager and compiled draw no random masks), packed rows, checkpointing, every kernel:
    eager's losses. On a GPU in bf16 see test_compiled_lora_on_gpu_bf16_keeps_eager_rounding."""
    from recipes.sft import main

    common = {"train.max_steps": 3, "data.packing": "true", "model.gradient_checkpointing": "true",
              "lora.enabled": "true", "trainable.freeze_llm": "true", "lora.dropout": "0", "optim.lr": "1e-3"}
    eager = main(sft_config(tmp_path / "eager", "qwen2_5_vl", mixed_data, **common, **{"model.kernels": "[all]"}))
    torch._dynamo.reset()
    compiled = main(sft_config(tmp_path / "compiled", "qwen2_5_vl", mixed_data, **common,
                               **{"model.kernels": "[all,compile_layers]"}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert compiled["losses"][-1] < compiled["losses"][0]


def bf16_lora_losses(tmp_path, mixed_data, monkeypatch) -> dict[str, list[float]]:
    """4 recipe steps of bf16 LoRA at lr 1e-5: eager, compiled (compile_layers' eager numerics) and compiled with
    inductor's fused casts (vltrain before round 9)."""
    from recipes.sft import main

    common = {"train.max_steps": 4, "data.packing": "true", "model.gradient_checkpointing": "true",
              "model.dtype": "bfloat16", "lora.enabled": "true", "trainable.freeze_llm": "true",
              "lora.dropout": "0", "optim.lr": "1e-5"}
    runs = {}
    for name, kernels in (("eager", "[all]"), ("compiled", "[all,compile_layers]"), ("fused", "[all,compile_layers]")):
        if name == "fused":
            monkeypatch.setattr("vltrain.kernels.compile_layers.EAGER_NUMERICS", {})
        torch._dynamo.reset()
        runs[name] = main(sft_config(tmp_path / name, "qwen2_5_vl", mixed_data, **common,
                                     **{"model.kernels": kernels}))["losses"]
    return runs


@pytest.mark.gpu
def test_compiled_lora_on_gpu_bf16_keeps_eager_rounding(tmp_path, mixed_data, monkeypatch):
    """bf16 LoRA at a small learning rate: while B is small, eager rounds the adapter's contribution to a layer's
    bf16 output away, and inductor's fused kernels keep it unless told to emulate eager's casts -- compiled LoRA
    then learned several times faster per step than eager and HF (bench_sft.py, 7B, RESULTS.md round 9). With
    compile_layers' eager numerics the losses are eager's; without them (the power check) they are not."""
    runs = bf16_lora_losses(tmp_path, mixed_data, monkeypatch)
    drop = {name: losses[0] - losses[-1] for name, losses in runs.items()}
    print(runs, drop)
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=2e-4)
    assert drop["fused"] > 1.5 * drop["eager"] > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels; on a GPU the test above runs")
def test_compiled_lora_in_bf16_on_cpu_gives_eager_losses_to_the_bit(tmp_path, mixed_data, monkeypatch):
    """The CPU side of the test above: in bf16 inductor's C++ kernels round like eager too once told to, and
    the compiled LoRA run's losses are eager's exactly; without the emulated casts (the power check) they are not.
    (The faster learning itself shows on the GPU, where the fused kernels keep the adapter's contribution.)"""
    runs = bf16_lora_losses(tmp_path, mixed_data, monkeypatch)
    assert runs["compiled"] == runs["eager"]
    assert runs["fused"] != pytest.approx(runs["eager"], rel=1e-6, abs=0)
