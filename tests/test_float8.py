"""kernels "float8" / "float8_rowwise": the LLM decoder-layer linears as torchao Float8Linear, on one instance.

On CPU torchao emulates the float8 matmul (operands quantized to float8 as on the GPU, multiplied in fp32), so
these tests see the quantization -- checked against a hand-written e4m3 reference -- but not the speed.

Tolerances against the unpatched model: e4m3 keeps 3 mantissa bits, so each matmul operand is rounded by up to
2^-4 (about 3.6% RMS of its value), roughly "2 significant digits". In the loss of a batch that rounding
mostly averages out over tokens; measured on the six tiny families (hidden 64) at random init the loss moves
by at most 1.8e-4 relative and the full gradient keeps a cosine similarity of at least 0.997 with the fp32 one.
The tests allow 1e-3 relative on the loss and a cosine of 0.99 (a gradient error of at most 14% of its norm),
and require that the loss is *not* bit-identical (float8 really ran).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.families import FAMILIES, family_spec, get_module
from vltrain.kernels import KERNELS, OPT_IN, applicable_kernels, apply_kernels
from vltrain.kernels.float8 import check_float8_supported
from vltrain.progress import model_inputs

from conftest import REPO, sft_config, stock_and_copy

Float8Linear = pytest.importorskip("torchao.float8.float8_linear").Float8Linear

FAMILY_NAMES = sorted(FAMILIES)
# The tiny configs (vltrain.tiny): 2 decoder layers, hidden 64. Per family, the linears of the decoder layers
# that float8 converts, written out by hand from the modeling code of transformers 5.24.
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "out_proj")  # in_proj_a / in_proj_b: 4 outputs, not converted
EXPECTED = {
    "qwen2_vl": {i: [f"self_attn.{p}" for p in ATTENTION] + [f"mlp.{p}" for p in MLP] for i in (0, 1)},
    "qwen2_5_vl": {i: [f"self_attn.{p}" for p in ATTENTION] + [f"mlp.{p}" for p in MLP] for i in (0, 1)},
    "qwen3_vl": {i: [f"self_attn.{p}" for p in ATTENTION] + [f"mlp.{p}" for p in MLP] for i in (0, 1)},
    "qwen3_vl_moe": {i: [f"self_attn.{p}" for p in ATTENTION] for i in (0, 1)},  # every MLP is fused experts
    "qwen3_5": {0: [f"linear_attn.{p}" for p in LINEAR_ATTENTION] + [f"mlp.{p}" for p in MLP],
                1: [f"self_attn.{p}" for p in ATTENTION] + [f"mlp.{p}" for p in MLP]},
    "qwen3_5_moe": {0: [f"linear_attn.{p}" for p in LINEAR_ATTENTION] + [f"mlp.shared_expert.{p}" for p in MLP],
                    1: [f"self_attn.{p}" for p in ATTENTION] + [f"mlp.shared_expert.{p}" for p in MLP]},
}


def expected_names(family):
    return sorted(f"model.language_model.layers.{i}.{name}" for i, names in EXPECTED[family].items() for name in names)


def float8_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, Float8Linear))


@pytest.fixture
def sft_batch(mixed_data):
    """A padded SFT batch of the four mixed samples (text, image, two images, video), per family."""

    def make(family, processor):
        media = MediaOptions(image_factor=family_spec(family).image_factor, image_max_pixels=64 * 64 * 2,
                             video_max_pixels=64 * 64, nframes=4)
        dataset = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(mixed_data.parent))
        return model_inputs(PadCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))]))

    return make


def loss_and_grad(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.flatten() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


# --- what is converted --------------------------------------------------------------------------------


def test_float8_is_opt_in_and_applies_to_every_family():
    for kernel in ("float8", "float8_rowwise"):
        assert kernel in KERNELS and kernel in OPT_IN
        assert all(kernel in applicable_kernels(family) for family in FAMILY_NAMES)
    stock, patched, _ = stock_and_copy("qwen2_vl")
    assert not any("float8" in entry for entry in apply_kernels(patched, ["all"]))
    assert not float8_names(patched)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float8_converts_the_decoder_layer_linears_and_nothing_else(family):
    stock, patched, _ = stock_and_copy(family)
    entries = apply_kernels(patched, ["float8"])
    names = expected_names(family)
    assert float8_names(patched) == names
    assert entries == [entry for entry in entries if entry.startswith("float8: ")] and len(entries) == 1
    assert entries[0].startswith(f"float8: {len(names)} Linear layers of model.language_model.layers (tensorwise)")
    stock_modules = dict(stock.named_modules())
    for name, module in patched.named_modules():  # everything else, vision tower and lm_head included, is stock
        if name not in names:
            assert type(module) is type(stock_modules[name]), name
    assert type(patched.lm_head) is nn.Linear
    assert not any(isinstance(m, Float8Linear) for m in patched.model.visual.modules())
    for name in names:  # same weights, same shapes: the state dict is the stock one
        converted, original = patched.get_submodule(name), stock.get_submodule(name)
        assert converted.weight.shape == original.weight.shape and torch.equal(converted.weight, original.weight)
    assert patched.state_dict().keys() == stock.state_dict().keys()
    if family_spec(family).moe:
        assert "MoE experts are fused 3-D weights, not nn.Linear: not converted" in entries[0]
        experts = [m for m in patched.modules() if type(m).__name__.endswith("Experts")]
        assert experts and not any(isinstance(p, Float8Linear) for m in experts for p in m.modules())
    if family.startswith("qwen3_5"):  # 64 -> 4 projections: features not multiples of 16, kept and named
        assert "; 2 kept (features not multiples of 16: linear_attn.in_proj_a, linear_attn.in_proj_b)" in entries[0]
        layer = patched.model.language_model.layers[0].linear_attn
        assert type(layer.in_proj_a) is nn.Linear and type(layer.in_proj_b) is nn.Linear
    if family == "qwen3_5_moe":
        assert type(patched.model.language_model.layers[0].mlp.shared_expert_gate) is nn.Linear  # a gate


def test_float8_is_idempotent_instance_only_and_survives_deepcopy():
    stock, patched, _ = stock_and_copy("qwen2_5_vl")
    first = apply_kernels(patched, ["float8"])
    modules = {name: id(patched.get_submodule(name)) for name in float8_names(patched)}
    assert apply_kernels(patched, ["float8"]) == first
    assert {name: id(patched.get_submodule(name)) for name in float8_names(patched)} == modules
    assert not float8_names(stock)  # another instance of the same class: untouched
    twin = copy.deepcopy(patched)  # what build_reference does for a frozen reference
    assert float8_names(twin) == float8_names(patched) and twin._vltrain_kernels == first
    with pytest.raises(ValueError, match="already float8 tensorwise"):
        apply_kernels(patched, ["float8_rowwise"])
    rowwise = apply_kernels(copy.deepcopy(stock), ["float8_rowwise"])
    assert rowwise == ["float8_rowwise: 14 Linear layers of model.language_model.layers (rowwise)"]


def test_float8_matmul_is_the_e4m3_quantized_one():
    """The converted q_proj computes x_q @ w_q.T with both operands rounded to e4m3 under one dynamic scale
    each (448 / amax): equal to that reference, and measurably different from the fp32 matmul."""
    stock, patched, _ = stock_and_copy("qwen2_vl")
    apply_kernels(patched, ["float8"])
    linear, original = patched.model.language_model.layers[0].self_attn.q_proj, stock.model.language_model.layers[0].self_attn.q_proj
    x = torch.randn(37, linear.in_features, generator=torch.Generator().manual_seed(0)) * 3

    def quantize(t):
        scale = (torch.finfo(torch.float8_e4m3fn).max / t.abs().max().double()).float()
        return (t * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() / scale

    reference = quantize(x) @ quantize(linear.weight.detach()).T + linear.bias.detach()
    out = linear(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    exact = original(x)
    error = (out - exact).norm() / exact.norm()
    assert 1e-3 < error < 0.1  # float8 rounding: a few percent, not zero


@pytest.mark.parametrize("kernel", ["float8", "float8_rowwise"])
def test_float8_pads_the_token_dim_to_16_and_is_exact(kernel, monkeypatch):
    """torch._scaled_mm needs the grad-weight matmul's token dim to be a multiple of 16 (a packed row of 7,528
    tokens failed on the H200): converted linears get inputs padded with zero rows, and the output and both
    gradients equal a plain Float8Linear's on the unpadded input (zero rows change no scale and no sum)."""
    _, patched, _ = stock_and_copy("qwen2_vl")
    apply_kernels(patched, [kernel])
    linear = patched.model.language_model.layers[0].mlp.down_proj
    plain = copy.deepcopy(linear)
    plain.__class__ = Float8Linear
    seen = []
    forward = Float8Linear.forward
    monkeypatch.setattr(Float8Linear, "forward", lambda self, x: seen.append(tuple(x.shape)) or forward(self, x))
    x = torch.randn(1, 37, linear.in_features, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for module in (linear, plain):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out)
        grads.append((xi.grad, module.weight.grad))
    assert seen == [(1, 48, linear.in_features), (1, 37, linear.in_features)]
    assert outs[0].shape == (1, 37, linear.out_features)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for padded, unpadded in zip(grads[0], grads[1]):
        torch.testing.assert_close(padded, unpadded, atol=0, rtol=0)
    copied = copy.deepcopy(patched).model.language_model.layers[0].mlp.down_proj
    assert type(copied) is type(linear) and copied.weight is not linear.weight


# --- numbers against the unpatched model -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float8_loss_and_gradient_are_close_to_stock_on_an_sft_batch(family, sft_batch, one_thread):
    stock, patched, processor = stock_and_copy(family)
    apply_kernels(patched, ["float8"])
    batch = sft_batch(family, processor)
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    ref, ref_grads = loss_and_grad(stock, batch)
    out, grads = loss_and_grad(patched, batch)
    assert out.loss.item() != ref.loss.item()  # the float8 path ran
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-3)
    assert grads.keys() == ref_grads.keys()  # every parameter still gets a gradient (weights stay parameters)
    cosine = F.cosine_similarity(torch.cat(list(grads.values())), torch.cat(list(ref_grads.values())), dim=0)
    assert cosine > 0.99


def test_float8_composes_with_all(sft_batch, one_thread):
    """[all, float8] = float8 plus the other kernels, which on CPU keep the numbers (module doc of
    test_kernels.py): the same loss and gradients as float8 alone, and the fused CE built no logits."""
    _, alone, processor = stock_and_copy("qwen2_5_vl")
    combined = copy.deepcopy(alone)
    apply_kernels(alone, ["float8"])
    entries = apply_kernels(combined, ["all", "float8"])
    assert "float8: 14 Linear layers of model.language_model.layers (tensorwise)" in entries
    assert {e.split(":")[0] for e in entries} >= {"float8", "fused_linear_ce", "rms_norm", "swiglu"}
    batch = sft_batch("qwen2_5_vl", processor)
    ref, ref_grads = loss_and_grad(alone, batch)
    out, grads = loss_and_grad(combined, batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_float8_is_applied_before_compile_layers_whatever_the_order_asked():
    _, patched, _ = stock_and_copy("qwen2_5_vl")
    entries = apply_kernels(patched, ["compile_layers", "float8"])
    assert [e.split(":")[0] for e in entries] == ["float8", "compile_layers"]


@pytest.mark.slow
def test_compiled_float8_layers_match_eager_float8(sft_batch, one_thread):
    """compile_layers over float8 layers (torchao is written for torch.compile): the compiled step gives the
    eager float8 loss and gradients."""
    _, eager, processor = stock_and_copy("qwen2_5_vl")
    compiled = copy.deepcopy(eager)
    apply_kernels(eager, ["float8"])
    apply_kernels(compiled, ["float8", "compile_layers"])
    batch = sft_batch("qwen2_5_vl", processor)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, ref_grads = loss_and_grad(eager, batch)
    out, grads = loss_and_grad(compiled, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=0)
    cosine = F.cosine_similarity(torch.cat(list(grads.values())), torch.cat(list(ref_grads.values())), dim=0)
    assert cosine > 0.9999


def test_applying_float8_leaves_the_global_rng_untouched():
    _, patched, _ = stock_and_copy("qwen3_5")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    apply_kernels(patched, ["float8"])
    assert torch.equal(torch.get_rng_state(), state)


# --- through a recipe ---------------------------------------------------------------------------------


def test_sft_recipe_with_float8_learns_like_without(tmp_path, mixed_data, one_thread):
    """`model.kernels=[all,float8]`: the recipe trains (loss falls as without float8, each step's loss close to
    the unpatched run's) and the export is a plain transformers checkpoint."""
    from transformers import AutoModelForImageTextToText

    from recipes.sft import main

    common = {"train.max_steps": 6, "train.micro_batch_size": 4}
    stock = main(sft_config(tmp_path / "stock", "qwen2_5_vl", mixed_data, **common, **{"model.kernels": "[all]"}))
    fp8 = main(sft_config(tmp_path / "fp8", "qwen2_5_vl", mixed_data, **common, **{"model.kernels": "[all,float8]"}))
    assert fp8["steps"] == 6 and fp8["losses"][-1] < 0.8 * fp8["losses"][0]  # 6.24 -> 4.58 measured, both runs
    assert stock["losses"][-1] < 0.8 * stock["losses"][0]
    # The runs drift apart a little each step (other rounding, then other weights): measured at most 0.3% in 6
    # steps; 2% allowed
    assert fp8["losses"] == pytest.approx(stock["losses"], rel=2e-2)
    assert fp8["losses"] != stock["losses"]
    exported = AutoModelForImageTextToText.from_pretrained(fp8["export_dir"])
    assert type(exported.model.language_model.layers[0].self_attn.q_proj) is nn.Linear


def test_float8_with_lora_converts_the_frozen_base_and_refuses_an_adapted_model(tmp_path, mixed_data, one_thread):
    """build_model applies kernels before LoRA: each adapted linear's frozen base is a Float8Linear, its
    adapters stay plain linears, and the run learns. Asked on a model that already has adapters: refused."""
    from peft import get_peft_model, LoraConfig

    from recipes.sft import main
    from vltrain.build import build_model

    overrides = {"lora.enabled": "true", "lora.rank": 16, "lora.alpha": 32, "lora.dropout": 0.0,
                 "trainable.freeze_llm": "true", "model.kernels": "[float8]", "train.max_steps": 4,
                 "train.micro_batch_size": 4, "optim.lr": 1e-2}
    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **overrides)
    built = build_model(cfg.model, cfg.trainable, cfg.lora)
    assert any(line.startswith("kernels: float8: 14 Linear layers") for line in built.report)
    q_proj = get_module(built.model, "model.language_model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj.base_layer, Float8Linear) and not q_proj.base_layer.weight.requires_grad
    assert type(q_proj.lora_A["default"]) is nn.Linear and type(q_proj.lora_B["default"]) is nn.Linear
    summary = main(cfg)
    assert summary["losses"][-1] < summary["losses"][0]

    _, model, _ = stock_and_copy("qwen2_vl")
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=family_spec("qwen2_vl").llm_lora_regex()))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj \(Linear\) is a peft LoRA layer: apply"):
        apply_kernels(adapted, ["float8"])


# --- refusals -------------------------------------------------------------------------------------------


def test_missing_torchao_is_a_clear_error(monkeypatch):
    for name in ("torchao", "torchao.float8", "torchao.float8.float8_linear"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao...` now raises ImportError
    _, patched, _ = stock_and_copy("qwen2_vl")
    with pytest.raises(ValueError, match=r"model.kernels=\[float8\] needs torchao: pip install 'vltrain\[fp8\]'"):
        apply_kernels(patched, ["float8"])
    with pytest.raises(ValueError, match=r"model.kernels=\[float8_rowwise\] needs torchao"):
        check_float8_supported("float8_rowwise", device="cpu")
    assert not float8_names(patched)


def test_a_gpu_without_fp8_matmuls_is_refused_and_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*found NVIDIA A100-SXM4-80GB \(8.0\)"):
        check_float8_supported("float8", device="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_supported("float8", device="cuda")  # H100 / H200
    check_float8_supported("float8", device="cpu")  # CPU: emulated, no capability to check


def test_a_quantized_base_is_refused():
    _, patched, _ = stock_and_copy("qwen2_vl")

    class Linear4bit(nn.Linear):  # stands for bitsandbytes' class (an nn.Linear subclass of that name)
        pass

    attention = patched.model.language_model.layers[1].self_attn
    attention.k_proj = Linear4bit(attention.k_proj.in_features, attention.k_proj.out_features)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj \(Linear4bit\) is quantized"):
        apply_kernels(patched, ["float8"])


# --- the benchmark --------------------------------------------------------------------------------------


def test_bench_fp8_runs_on_cpu_with_a_tiny_preset(tmp_path):
    """The eager rows and the loss agreement, on small samples (the compiled rows take minutes on CPU: the
    compiled float8 layers are checked by test_compiled_float8_layers_match_eager_float8)."""
    import os

    out = tmp_path / "fp8.json"
    cmd = [sys.executable, "benchmarks/bench_fp8.py", "--preset", "tiny_qwen2_5_vl", "--steps", "2", "--warmup", "0",
           "--num_samples", "1", "--sample_tokens", "32", "--token_budget", "1", "--no_compile",
           "--agreement_steps", "3", "--agreement_samples", "1", "--agreement_pool", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny_qwen2_5_vl" and result["torchao"]
    rows = result["runs"]
    assert [(r["precision"], r["compile_layers"]) for r in rows] == [("fp32", False), ("float8", False)]
    for row in rows:
        assert row["ok"], row.get("error")
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and len(row["step_times"]) == 2
        assert {"mfu", "peak_gib", "tflops", "real_tokens", "speedup"} <= row.keys()
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert not any(k.startswith("float8") for k in rows[0]["kernels"])
    assert rows[1]["kernels"][0].startswith("float8: 14 Linear layers")
    agreement = result["agreement"]
    assert agreement["steps"] == 3 and len(agreement["baseline"]) == len(agreement["float8"]) == 3
    diffs = [abs(f - b) / abs(b) for b, f in zip(agreement["baseline"], agreement["float8"])]
    assert agreement["rel_diff"] == pytest.approx(diffs) and agreement["max_rel_diff"] == pytest.approx(max(diffs))
    assert 0 < agreement["max_rel_diff"] < 5e-2  # float8 ran, and stayed close
    assert "float8" in proc.stdout and "max rel diff" in proc.stdout


# --- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_float8_on_gpu_bf16_tracks_bf16_over_training_steps():
    """bf16 on CUDA (fp8 matmuls through torch._scaled_mm, not emulated), a small-but-not-tiny Qwen2.5-VL
    (hidden 1024, 4 layers): 30 steps on the same data from the same weights. Over the first 5 steps, where
    the weights have barely moved, the losses differ by the float8 rounding alone: within 3% of bf16's (on
    Qwen2.5-VL-3B, H200, 2026-12-02: at most 0.63%). Later the two trajectories drift apart as any two runs
    with different rounding do (the 3B run: 4.5% by step 12, 84% once both losses are near 0.02), so after
    that the test asks only that both learn as much: each falls by >= 10%, float8's last loss at most 1.5x
    bf16's. (An earlier version asked 3% at every step and failed on the H200, 2026-12-02; this one has not
    yet run on a GPU.)"""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fp8 import agreement_run

    result = agreement_run("small_qwen2_5_vl", torch.device("cuda"), num_samples=4, steps=30, pool=8, token_budget=8192)
    bf16, fp8 = result["baseline"], result["float8"]
    assert max(result["rel_diff"][:5]) < 3e-2, result
    assert fp8[-1] < 0.9 * fp8[0] and bf16[-1] < 0.9 * bf16[0], result
    assert fp8[-1] < 1.5 * bf16[-1] + 0.05, result


def test_recipes_check_float8_before_the_model_loads(monkeypatch):
    """vltrain.distributed.check_kernels_supported (every recipe's open_run, before any weight loads) refuses
    float8 without torchao, and under ZeRO-3 / FSDP sharding, naming the field."""
    from types import SimpleNamespace

    from vltrain import distributed

    accelerator = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(fsdp_plugin=None))
    distributed.check_kernels_supported(accelerator, SimpleNamespace(kernels=["all", "float8"]))  # fine on CPU
    sharded = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(fsdp_plugin=object()))
    with pytest.raises(ValueError, match="model.kernels float8 is not supported under ZeRO-3/FSDP"):
        distributed.check_kernels_supported(sharded, SimpleNamespace(kernels=["float8"]))
    distributed.check_kernels_supported(sharded, SimpleNamespace(kernels=["all"]))
    for name in ("torchao", "torchao.float8", "torchao.float8.float8_linear"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match=r"model.kernels=\[float8_rowwise\] needs torchao"):
        distributed.check_kernels_supported(accelerator, SimpleNamespace(kernels=["float8_rowwise"]))
