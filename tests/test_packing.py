"""Packing numerics on tiny models: a packed row computes exactly what its examples compute alone.

CPU tests run in fp32 (atol 1e-5 on losses, 1e-4 on gradients) through the masked varlen fallback.
GPU tests (`-m gpu`) run torch's varlen attention (or flash-attn) in bf16 with the tolerances stated.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from vltrain.attention import causal_varlen_attention, enable_packed_attention, masked_causal_varlen_attention
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.data.packing import PackCollator, TokenBudgetBatchSampler, example_lengths
from vltrain.families import family_spec
from vltrain.tiny import build_tiny

from conftest import FAMILIES, sft_config

gpu = pytest.mark.gpu


@functools.lru_cache(maxsize=None)
def _tiny(model_type):
    model, processor = build_tiny(model_type)
    model.config.use_cache = False
    return model.eval(), processor


def _examples(model_type, processor, media_dir, mixed_data):
    """text-only, one image, two images, one video: the four mixed records, encoded."""
    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    examples = [ds[i] for i in range(len(ds))]
    assert any("pixel_values_videos" in e for e in examples) and any("pixel_values" in e for e in examples)
    return examples


def _inputs(batch):
    """The model's inputs: the tensors (ids, skip / truncation records and extra fields are lists)."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


def _packed_and_stock(model_type, device="cpu", dtype=torch.float32):
    model, processor = _tiny(model_type)
    stock = copy.deepcopy(model).to(device=device, dtype=dtype)
    packed = copy.deepcopy(stock)
    enable_packed_attention(packed)
    return stock, packed, processor


def _to(batch, device, dtype):
    return {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v) and v.is_floating_point() else
                v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _per_example_vs_packed(model_type, media_dir, mixed_data, device="cpu", dtype=torch.float32):
    stock, packed, processor = _packed_and_stock(model_type, device, dtype)
    examples = _examples(model_type, processor, media_dir, mixed_data)
    num_tokens = sum(int((e["labels"][1:] != -100).sum()) for e in examples)
    pad = PadCollator(processor.tokenizer.pad_token_id)
    ref = sum(stock(**_to(_inputs(pad([e])), device, dtype), num_items_in_batch=num_tokens).loss for e in examples)
    ref.backward()
    batch = _to(_inputs(PackCollator(stock)(examples)), device, dtype)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    loss = packed(**batch, num_items_in_batch=num_tokens).loss
    loss.backward()
    return ref, loss, stock, packed


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_loss_and_gradients_equal_the_per_example_sum(model_type, media_dir, mixed_data):
    """Four examples (text, image, two images, video) in one row == each alone, summed (global token mean)."""
    ref, loss, stock, packed = _per_example_vs_packed(model_type, media_dir, mixed_data)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(stock.named_parameters(), packed.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_position_ids_per_example_equal_the_models_own(model_type, media_dir, mixed_data):
    """Rows 1-3 of the packed ids, sliced per example, are what the model computes for it unpacked."""
    model, processor = _tiny(model_type)
    examples = _examples(model_type, processor, media_dir, mixed_data)
    packed = PackCollator(model)(examples)["position_ids"]
    assert packed.shape == (4, 1, sum(len(e["input_ids"]) for e in examples))
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    try:
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            with torch.no_grad():
                model(**_inputs(PadCollator(processor.tokenizer.pad_token_id)([e])))
            own = seen.pop()
            assert own.shape[-1] == n
            torch.testing.assert_close(packed[1:, :, start:start + n], own.reshape(3, 1, n), atol=0, rtol=0)
            torch.testing.assert_close(packed[0, 0, start:start + n], torch.arange(n), atol=0, rtol=0)
            start += n
    finally:
        hook.remove()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_5"])
def test_attention_never_crosses_examples(model_type, media_dir, mixed_data):
    """Changing the second example's tokens changes its logits and nothing before it."""
    _, packed, processor = _packed_and_stock(model_type)
    examples = _examples(model_type, processor, media_dir, mixed_data)[:2]
    other = [examples[0], dict(examples[1])]
    other[1]["input_ids"] = examples[1]["input_ids"].clone()
    text = (other[1]["mm_token_type_ids"] == 0).nonzero().flatten()
    other[1]["input_ids"][text[5:]] = 7  # keep the header, change the rest of the text
    collate = PackCollator(packed)
    n0 = len(examples[0]["input_ids"])
    with torch.no_grad():
        a = packed(**_inputs(collate(examples))).logits[0]
        b = packed(**_inputs(collate(other))).logits[0]
    torch.testing.assert_close(a[:n0], b[:n0], atol=0, rtol=0)
    assert (a[n0:] - b[n0:]).abs().max() > 1e-3


def test_first_label_of_every_example_is_ignored():
    examples = [{"input_ids": torch.arange(5), "labels": torch.arange(5), "mm_token_type_ids": torch.zeros(5, dtype=torch.long)}
                for _ in range(3)]
    model, _ = _tiny("qwen2_vl")
    batch = PackCollator(model)(examples)
    assert batch["labels"][0, [0, 5, 10]].tolist() == [-100] * 3
    assert batch["labels"][0, [1, 6, 11]].tolist() == [1, 1, 1]
    assert batch["position_ids"][0, 0].tolist() == list(range(5)) * 3


def test_token_budget_sampler_respects_the_budget_and_covers_every_example():
    lengths = [100, 900, 300, 300, 50, 1000, 20, 700, 400, 1]
    sampler = TokenBudgetBatchSampler(lengths, 1000, shuffle=True, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert all(sum(lengths[i] for i in b) <= 1000 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(sampler) == len(batches)
    assert [b for b in TokenBudgetBatchSampler(lengths, 1000, shuffle=False)][0] == [0, 1]
    with pytest.raises(ValueError, match="longer than max_tokens_per_batch"):
        TokenBudgetBatchSampler(lengths, 999)


def test_token_budget_config_is_validated(tmp_path, mixed_data):
    with pytest.raises(ValueError, match="data.max_tokens_per_batch"):
        sft_config(tmp_path, "qwen2_vl", mixed_data, **{"data.max_tokens_per_batch": 100})


def test_example_lengths_match_the_encoded_examples(media_dir, mixed_data):
    _, processor = _tiny("qwen2_vl")
    media = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    assert example_lengths(ds) == [len(ds[i]["input_ids"]) for i in range(len(ds))]


@pytest.mark.parametrize("model_type,kernels", [("qwen2_5_vl", "[all]"), ("qwen3_5", "[]")])
def test_sft_with_packing_and_token_budget_trains(model_type, kernels, tmp_path, mixed_data):
    from recipes.sft import main

    cfg = sft_config(tmp_path, model_type, mixed_data, **{
        "data.packing": True, "data.max_tokens_per_batch": 1024, "train.max_steps": 12, "model.kernels": kernels})
    summary = main(cfg)
    assert summary["steps"] == 12 and summary["losses"][0] > 5.0
    assert summary["final_loss"] < 0.6 * summary["losses"][0]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_packing_with_padding_mask_is_refused():
    _, packed, _ = _packed_and_stock("qwen2_vl")
    ids = torch.randint(0, 400, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with pytest.raises(ValueError, match="must not be padded"):
        packed(input_ids=ids, attention_mask=mask)


def test_masked_fallback_equals_per_segment_causal_sdpa():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    out = masked_causal_varlen_attention(q, k, v, cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(2, 0),
            v[a:b].transpose(0, 1).repeat_interleave(2, 0), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[a:b], ref, atol=1e-6, rtol=1e-5)


@gpu
def test_gpu_varlen_attention_matches_per_segment_sdpa():
    """bf16, GQA 16/2 heads: the fast path (`flash_varlen`) vs sdpa per segment; bf16 rounding: atol 2e-2."""
    torch.manual_seed(0)
    lengths = [1, 300, 77, 1024, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n = sum(lengths)
    q = torch.randn(n, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = causal_varlen_attention(q, k, v, cu, max(lengths), scale=128**-0.5)
    ref = masked_causal_varlen_attention(q.float(), k.float(), v.float(), cu, scale=128**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_direct_flash_kernels_match_torch_varlen_attn(causal):
    """`flash_varlen`'s direct call of torch's flash kernels (no custom-op dispatch) and
    torch.nn.attention.varlen.varlen_attn (which may pick cuDNN instead), bf16, GQA 16/2 heads (the vision towers
    call it with causal=False and equal head counts): output and q/k/v gradients within bf16 rounding of the fp32
    per-segment reference, each path as close as the other."""
    from torch.nn.attention.varlen import varlen_attn

    from vltrain.attention import _AtenFlashVarlen, _aten_flash_usable, _torch_varlen_call

    if not _aten_flash_usable(torch.cuda.current_device()):
        pytest.skip("torch's flash kernels do not run on this GPU")
    torch.manual_seed(0)
    lengths = [1, 300, 77, 1024, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n, kv_heads, scale = sum(lengths), 2 if causal else 16, 128 ** -0.5
    leaves = [torch.randn(n, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for h in (16, kv_heads, kv_heads)]
    grad = torch.randn(n, 16, 128, device="cuda", dtype=torch.bfloat16)

    def reference(q, k, v):  # fp32, one sdpa call per segment
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            rep = q.shape[1] // k.shape[1]
            outs.append(F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(rep, 0),
                v[a:b].transpose(0, 1).repeat_interleave(rep, 0), is_causal=causal, scale=scale).transpose(0, 1))
        return torch.cat(outs)

    runs = {"direct": lambda q, k, v: _AtenFlashVarlen.apply(q, k, v, cu, max(lengths), causal, scale),
            "varlen_attn": lambda q, k, v: _torch_varlen_call(varlen_attn, q, k, v, cu, max(lengths), causal, scale),
            "fp32": lambda q, k, v: reference(q.float(), k.float(), v.float())}
    results = {}
    for name, run in runs.items():
        out = run(*leaves)
        results[name] = [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, leaves, grad.to(out.dtype)))]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    errors = {name: [rel(got, want) for got, want in zip(results[name], results["fp32"])] for name in ("direct", "varlen_attn")}
    print(f"\ncausal={causal}: relative L2 error vs fp32 (out, dq, dk, dv): {errors}; bit-equal to varlen_attn: "
          f"{all(torch.equal(a, b) for a, b in zip(results['direct'], results['varlen_attn']))}")
    for got, want in zip(errors["direct"], errors["varlen_attn"]):
        assert got < 1e-2 and got < 1.5 * want + 1e-3, errors


@gpu
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_gpu_packed_loss_matches_per_example_in_bf16(model_type, media_dir, mixed_data):
    """bf16 on CUDA through the fast varlen path: loss within 1e-2 relative of the per-example sum."""
    ref, loss, _, _ = _per_example_vs_packed(model_type, media_dir, mixed_data, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(loss.float(), ref.float(), atol=2e-2, rtol=1e-2)


def test_resume_with_packing_and_token_budget_gives_the_same_losses(tmp_path, mixed_data):
    import shutil

    from recipes.sft import main

    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{
        "data.packing": True, "data.max_tokens_per_batch": 160, "data.max_seq_length": 160,
        "train.max_steps": 6, "train.save_every": 3, "train.save_total_limit": 3})
    straight = main(cfg)["losses"]
    assert json.loads((tmp_path / "out" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())[
        "next_batch"] > 0, "the resume point must be inside an epoch"
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step_000006")
    cfg.train.resume = "auto"
    resumed = main(cfg)["losses"]  # the whole history: steps 1-3 restored from the checkpoint, 4-6 trained again
    assert len(resumed) == 6 and resumed[3:] == straight[3:]


def test_linear_attention_after_full_attention_packed_without_checkpointing(media_dir, mixed_data):
    """Qwen3.5 with a linear-attention layer after a full-attention one (as in every real config), in
    training mode without checkpointing (the model would build a cache): packed == per example."""
    from transformers import AutoModelForImageTextToText

    from vltrain.tiny import tiny_config

    _, processor = _tiny("qwen3_5")
    config = tiny_config("qwen3_5", processor.tokenizer)
    config.text_config.layer_types = ["linear_attention", "full_attention", "linear_attention"]
    config.text_config.num_hidden_layers = 3
    torch.manual_seed(0)
    stock = AutoModelForImageTextToText.from_config(config).train()
    packed = copy.deepcopy(stock)
    assert any("use_cache off" in line for line in enable_packed_attention(packed))
    examples = _examples("qwen3_5", processor, media_dir, mixed_data)
    num_tokens = sum(int((e["labels"][1:] != -100).sum()) for e in examples)
    pad = PadCollator(processor.tokenizer.pad_token_id)
    ref = sum(stock(**_inputs(pad([e])), num_items_in_batch=num_tokens, use_cache=False).loss for e in examples)
    loss = packed(**_inputs(PackCollator(stock)(examples)), num_items_in_batch=num_tokens).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_padded_groups_bound_the_padding():
    from vltrain.attention import _padded_groups

    lengths = [2000, 50, 60, 1900, 70, 1800, 400]
    groups = _padded_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 2 * sum(lengths[i] for i in g)
    assert len(groups) < len(lengths)  # similar lengths share a batch


# --- Qwen3.5 gated delta net over packed rows: the varlen path (flash-linear-attention on CUDA) ----------
def _gated_delta_net(dtype=torch.float32, device="cpu", head_dim=16, hidden=64):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    _, processor = _tiny("qwen3_5")
    from vltrain.tiny import tiny_config

    text = tiny_config("qwen3_5", processor.tokenizer).text_config
    text.hidden_size, text.linear_key_head_dim, text.linear_value_head_dim = hidden, head_dim, head_dim
    torch.manual_seed(0)
    return Qwen3_5GatedDeltaNet(text, layer_idx=0).to(device=device, dtype=dtype)


def _reference_conv(x, weight, bias, activation, cu_seqlens, cu_seqlens_cpu):
    """fla.causal_conv1d's contract in plain torch: a causal depthwise conv restarting at each segment."""
    bounds = cu_seqlens_cpu.tolist()
    outs = [torch.nn.functional.conv1d(x[:, a:b].transpose(1, 2), weight.unsqueeze(1), bias, groups=x.shape[-1],
                                       padding=weight.shape[-1] - 1)[..., : b - a] for a, b in zip(bounds, bounds[1:])]
    assert activation == "silu"
    return torch.nn.functional.silu(torch.cat(outs, dim=-1)).transpose(1, 2), None


def _reference_delta(q, k, v, g, beta, use_qk_l2norm_in_kernel, cu_seqlens, cu_seqlens_cpu):
    """fla.chunk_gated_delta_rule's varlen contract: transformers' torch rule once per segment."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    rule = getattr(torch_chunk_gated_delta_rule, "__wrapped__", torch_chunk_gated_delta_rule)  # the torch one
    bounds = cu_seqlens_cpu.tolist()
    return torch.cat([rule(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                           use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                      for a, b in zip(bounds, bounds[1:])], dim=1), None


def _packed_rows(hidden, lengths_per_row, dtype, device):
    """Random (B, L, H) hidden states and their text positions for rows holding examples of these lengths."""
    width = sum(lengths_per_row[0])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row]).to(device)
    torch.manual_seed(1)
    return torch.randn(len(lengths_per_row), width, hidden, dtype=dtype, device=device), positions


def _per_example_and_varlen(module, lengths_per_row, dtype, device, conv_fn, delta_fn):
    """(outputs, input grads, param grads) of the stock forward example by example, and of the varlen one."""
    from vltrain.attention import _linear_segments, varlen_gated_delta_forward

    x, positions = _packed_rows(module.hidden_size, lengths_per_row, dtype, device)
    cu, cu_cpu, _ = _linear_segments(positions)
    runs = []
    for varlen in (False, True):
        xi = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        if varlen:
            out = varlen_gated_delta_forward(module, xi, cu, cu_cpu, conv_fn, delta_fn)
        else:
            out = torch.cat([torch.cat([module(xi[r:r + 1, a:a + n]) for a, n in
                                        zip([sum(row[:i]) for i in range(len(row))], row)], dim=1)
                             for r, row in enumerate(lengths_per_row)])
        out.float().square().sum().backward()
        runs.append([out, xi.grad] + [p.grad for p in module.parameters()])
    return runs


def test_varlen_gated_delta_forward_matches_the_stock_forward_per_example():
    """fp32 on CPU, fla's two ops stood in for by their per-segment torch contracts: the varlen forward
    (one call over two packed rows of 3 + 1 examples) == the stock forward run on each example alone,
    outputs and every gradient (atol 1e-5)."""
    module = _gated_delta_net()
    stock, varlen = _per_example_and_varlen(module, [[5, 11, 4], [20]], torch.float32, "cpu",
                                            _reference_conv, _reference_delta)
    for got, want in zip(varlen, stock):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@gpu
def test_gpu_fla_varlen_gated_delta_matches_the_stock_forward_per_example():
    """bf16 on CUDA through flash-linear-attention's varlen kernels (Qwen3.5-4B head sizes: 128), vs the stock
    forward on each example alone: output and every gradient within 3% relative L2 error."""
    pytest.importorskip("fla")
    from vltrain.attention import _fla_ops

    module = _gated_delta_net(torch.bfloat16, "cuda", head_dim=128, hidden=256)
    try:
        stock, varlen = _per_example_and_varlen(module, [[300, 700, 24], [1024]], torch.bfloat16, "cuda", *_fla_ops())
    except RuntimeError as e:  # fla 0.6 refuses the backward on Hopper with Triton 3.4-3.7.0 (wrong results)
        if "Triton" not in str(e):
            raise
        pytest.skip(f"flash-linear-attention cannot run here: {e}")
    for got, want in zip(varlen, stock):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 3e-2, err
