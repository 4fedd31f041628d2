"""Chunked target log-probs (vltrain.logprobs) against a plain full-logits reference, on every family.

The reference is the stock forward's `logits`, `log_softmax(logits.float() / T)` gathered at the
shifted labels. Values are compared in fp32 at atol 1e-5, gradients (after backward of a random
weighted sum of the outputs) at atol 1e-5 on every parameter.

The slow tests run this file as a 2-process worker (torchrun, CPU gloo) under ZeRO-3 and FSDP2:
rank 0 holds a text-only example and rank 1 an image example; values and one SGD step must match
one process computing both:

    torchrun --nproc_per_node 2 tests/test_logprobs.py BACKEND MEDIA_DIR OUT_DIR
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vltrain.attention import _segment_bounds, enable_packed_attention
from vltrain.config import LoraConfig, TrainableConfig
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.data.packing import PackCollator
from vltrain.families import family_spec
from vltrain.kernels import apply_kernels
from vltrain.kernels import fused_ce
from vltrain.logprobs import sequence_ids, sequence_logprobs, token_logprobs, token_logprobs_and_entropy
from vltrain.lora import apply_lora
from vltrain.progress import model_inputs
from vltrain.tiny import build_tiny
from vltrain.trainable import configure_trainable

from conftest import FAMILIES, REPO

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@functools.lru_cache(maxsize=None)
def _tiny(model_type):
    model, processor = build_tiny(model_type)
    model.config.use_cache = False
    return model.eval(), processor


def _fresh(model_type):
    model, processor = _tiny(model_type)
    return copy.deepcopy(model), processor


_ENCODED: dict[tuple[str, int], dict] = {}


def _examples(model_type, media_dir, mixed_data, which=(0, 1, 2, 3)):
    """Mixed records (0 text, 1 image, 2 two images, 3 video), each encoded once per family: every
    test's `mixed_data` / `media_dir` fixtures hold the same files."""
    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(mixed_data, _tiny(model_type)[1], media, max_seq_length=1024, image_folder=str(media_dir))
    for i in which:
        if (model_type, i) not in _ENCODED:
            _ENCODED[model_type, i] = ds[i]
    return [_ENCODED[model_type, i] for i in which]


def _padded(model_type, examples):
    return PadCollator(_tiny(model_type)[1].tokenizer.pad_token_id)(examples)


def reference_token_logprobs(model, batch, temperature=1.0, entropy=False):
    """Full (B, L, V) logits from the stock path, shifted and gathered: the thing being replaced."""
    logp = torch.log_softmax(model(**model_inputs(batch, labels=False)).logits.float() / temperature, dim=-1)
    labels = batch["labels"]
    picked = logp[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    out = torch.zeros(labels.shape, dtype=torch.float32)
    out[:, 1:] = torch.where(labels[:, 1:] != -100, picked, 0.0)
    if not entropy:
        return out
    ent = torch.zeros(labels.shape, dtype=torch.float32)
    ent[:, 1:] = torch.where(labels[:, 1:] != -100, -(logp.exp() * logp).sum(-1)[:, :-1], 0.0)
    return out, ent


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(grads, ref_grads, model_type, must_have=("lm_head", "language_model", "visual")):
    """Every parameter's gradient equal (a missing one counts as zero), and the listed parts non-zero."""
    for name in grads.keys() | ref_grads.keys():
        a, b = grads.get(name), ref_grads.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=lambda m: f"{model_type} {name}: {m}")
    for part in must_have:
        assert any(part in n and g.abs().sum() > 0 for n, g in ref_grads.items()), f"no gradient reached {part}"


def _weights(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5


# ------------------------------------------------------------------------------- padded and packed
@pytest.mark.parametrize("model_type", FAMILIES)
def test_padded_batch_matches_full_logits(model_type, media_dir, mixed_data):
    """Text-only, image, two-image and video rows padded together; entropy too; 7-token chunks."""
    model, _ = _fresh(model_type)
    batch = _padded(model_type, _examples(model_type, media_dir, mixed_data))
    weights = _weights(batch["labels"].shape)

    ref, ref_entropy = reference_token_logprobs(model, batch, entropy=True)
    ((ref * weights).sum() + 0.1 * ref_entropy.sum()).backward()
    ref_grads = _grads(model)

    out, entropy = token_logprobs_and_entropy(model, batch, chunk_size=7)
    assert out.shape == batch["labels"].shape and out.dtype == torch.float32
    ((out * weights).sum() + 0.1 * entropy.sum()).backward()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=ATOL, rtol=0)
    assert (out[:, 0] == 0).all() and (out[batch["labels"] == -100] == 0).all()
    assert (out[:, 1:][batch["labels"][:, 1:] != -100] < 0).all()
    assert_same_grads(_grads(model), ref_grads, model_type)

    logp_sum, num_tokens = sequence_logprobs(model, batch, chunk_size=7)
    torch.testing.assert_close(logp_sum, ref.sum(1), atol=ATOL, rtol=1e-6)
    assert num_tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_row_matches_each_example_alone(model_type, media_dir, mixed_data):
    """Four examples packed in one row (packed attention) == each example alone through the stock model,
    at temperature 0.7: per-token values, per-example sums and counts, gradients of a weighted sum."""
    temperature = 0.7
    stock, _ = _fresh(model_type)
    packed = copy.deepcopy(stock)
    enable_packed_attention(packed)
    examples = _examples(model_type, media_dir, mixed_data)
    seq_weights = _weights(len(examples), seed=1)

    refs = [reference_token_logprobs(stock, _padded(model_type, [e]), temperature) for e in examples]
    sum(w * r.sum() for w, r in zip(seq_weights, refs)).backward()
    ref_grads = _grads(stock)

    batch = PackCollator(packed)(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    logp_sum, num_tokens = sequence_logprobs(packed, batch, temperature=temperature, chunk_size=16)
    (logp_sum * seq_weights).sum().backward()
    torch.testing.assert_close(logp_sum, torch.stack([r.sum() for r in refs]), atol=ATOL, rtol=1e-6)
    assert num_tokens.tolist() == [int((e["labels"][1:] != -100).sum()) for e in examples]
    assert_same_grads(_grads(packed), ref_grads, model_type)

    with torch.no_grad():
        out = token_logprobs(packed, batch, temperature=temperature)
    torch.testing.assert_close(out, torch.cat(refs, dim=1), atol=ATOL, rtol=0)


def test_sequence_ids_start_where_text_position_is_zero():
    text = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.stack([text, text, text, text])}
    seq, num = sequence_ids(batch)
    assert num == 4 and seq.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    starts = _segment_bounds(text)[:-1].tolist()  # the packed attention's view of the same row
    assert [i for i in range(8) if i == 0 or seq[0, i] != seq[0, i - 1]] == starts
    padded = dict(batch, attention_mask=torch.ones(1, 8))  # a padded batch: one sequence per row
    assert sequence_ids(padded)[1] == 1


def test_labels_at_a_packed_example_start_are_not_predicted_across_examples():
    model, _ = _fresh("qwen2_vl")
    enable_packed_attention(model)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    text = torch.tensor([list(range(6)) + list(range(6))])
    batch = {"input_ids": ids, "labels": ids.clone(), "mm_token_type_ids": torch.zeros_like(ids),
             "position_ids": torch.stack([text] * 4)}
    with torch.no_grad():
        out = token_logprobs(model, batch)
        logp_sum, num_tokens = sequence_logprobs(model, batch)
    assert out[0, 0] == 0 and out[0, 6] == 0 and (out[0, 1:6] < 0).all() and (out[0, 7:] < 0).all()
    assert num_tokens.tolist() == [5, 5]
    torch.testing.assert_close(logp_sum, torch.stack([out[0, :6].sum(), out[0, 6:].sum()]))


def test_bf16_model_without_gradients_matches_full_logits():
    """bf16 weights: the chunk matmul runs in bf16 as the stock lm_head does, the softmax in fp32."""
    model, _ = build_tiny("qwen2_vl", dtype=torch.bfloat16)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = reference_token_logprobs(model, batch)
        out = token_logprobs(model, batch, chunk_size=5)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------- memory: chunk-sized logits
class _VocabShapes(TorchDispatchMode):
    """Records the shape of every tensor any op (forward or backward) produces with a vocab-sized last dim."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_are_only_ever_chunk_sized(model_type):
    model, _ = _fresh(model_type)
    vocab, hidden = model.lm_head.weight.shape
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "mm_token_type_ids": torch.zeros_like(ids), "num_skipped": 0, "sample_id": ["a", "b"]}
    chunk_size = 5

    stock = _VocabShapes(vocab)
    with stock:  # the detector sees the full logits of the stock path, so the check below can fail
        reference_token_logprobs(model, batch).sum().backward()
    assert max(torch.Size(s[:-1]).numel() for s in stock.shapes) >= 2 * 24
    model.zero_grad(set_to_none=True)

    chunked, saved = _VocabShapes(vocab), []
    with chunked:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_note_vocab_sized, saved, vocab), _same):
            out = token_logprobs(model, batch, chunk_size=chunk_size)
        out.sum().backward()
    logits_like = [s for s in chunked.shapes if s != (hidden, vocab)]  # (H, V): lm_head.weight transposed
    assert logits_like, "the detector saw no logits at all"
    assert max(torch.Size(s[:-1]).numel() for s in logits_like) <= chunk_size, sorted(set(chunked.shapes))
    # nothing vocab-sized is kept for backward (each chunk is recomputed there); the stock path keeps (B, L, V)
    assert not saved, saved
    with torch.autograd.graph.saved_tensors_hooks(functools.partial(_note_vocab_sized, saved, vocab), _same):
        reference_token_logprobs(model, batch)
    assert (2, 24, vocab) in saved


def _note_vocab_sized(saved, vocab, tensor):
    if tensor.dim() >= 2 and tensor.shape[-1] == vocab and tensor.shape[-2] != vocab:
        saved.append(tuple(tensor.shape))
    return tensor


def _same(tensor):
    return tensor


# ------------------------------------------------------------------------------- LoRA, kernels, deepcopy
@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_model_with_a_dummy_video(model_type, media_dir, mixed_data):
    """peft model, batch of text + image (complete_modalities appends a dummy video)."""
    model, _ = _fresh(model_type)
    configure_trainable(model, TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True),
                        adapters_follow=True)
    model = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    batch = _padded(model_type, _examples(model_type, media_dir, mixed_data, which=(0, 1)))
    assert "pixel_values_videos" not in batch
    weights = _weights(batch["labels"].shape)

    ref = reference_token_logprobs(model, batch)
    (ref * weights).sum().backward()
    ref_grads = _grads(model)
    out = token_logprobs(model, batch, chunk_size=11)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    grads = _grads(model)
    assert grads and all("lora_" in n for n in grads)
    assert_same_grads(grads, ref_grads, model_type, must_have=("lora_B",))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_with_fused_linear_ce_and_cpu_kernels(model_type, media_dir, mixed_data):
    """Kernels applied after a first call; text-only batch (dummy image and video appended); the model's
    fused SFT loss still works afterwards."""
    stock, _ = _fresh(model_type)
    model = copy.deepcopy(stock)
    batch = _padded(model_type, _examples(model_type, media_dir, mixed_data, which=(0,)))
    with torch.no_grad():
        before = token_logprobs(model, batch)
    patched = apply_kernels(model, ["all"])
    assert any("fused_linear_ce" in p for p in patched)
    weights = _weights(batch["labels"].shape)

    ref = reference_token_logprobs(stock, batch)
    (ref * weights).sum().backward()
    ref_grads = _grads(stock)
    out = token_logprobs(model, batch, chunk_size=8)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(before, ref.detach(), atol=ATOL, rtol=0)
    assert_same_grads(_grads(model), ref_grads, model_type, must_have=("lm_head", "language_model"))

    assert model.lm_head.forward.__func__ is fused_ce._lm_head_forward  # the kernel's patch is back
    inputs = model_inputs(batch)
    fused = model(**inputs)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, stock(**inputs).loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_deepcopy_reference_is_independent(model_type, media_dir, mixed_data):
    """A DPO reference copy of a patched model computes its own log-probs, into its own gradients."""
    model, _ = _fresh(model_type)
    apply_kernels(model, ["fused_linear_ce"])
    enable_packed_attention(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.5)
    assert reference.lm_head.forward.__self__ is reference.lm_head
    examples = _examples(model_type, media_dir, mixed_data, which=(0, 1))
    batch = PackCollator(model)(examples)

    ref_sum, _ = sequence_logprobs(reference, batch)
    policy_sum, _ = sequence_logprobs(model, batch)
    ref_sum.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert reference.lm_head.weight.grad is not None
    assert (ref_sum - policy_sum).abs().min() > 1e-3  # the copy used its own (scaled) head

    stock_copy, _ = _fresh(model_type)
    with torch.no_grad():
        stock_copy.lm_head.weight.mul_(1.5)
        expected = [reference_token_logprobs(stock_copy, _padded(model_type, [e])).sum() for e in examples]
    torch.testing.assert_close(ref_sum.detach(), torch.stack(expected), atol=ATOL, rtol=1e-6)


# ------------------------------------------------------------------------------- user mistakes
def test_user_mistakes_raise_value_errors():
    model, _ = _tiny("qwen2_vl")
    ids = torch.randint(0, 400, (1, 8))
    batch = {"input_ids": ids, "labels": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, dict(batch, labels=ids[:, :4]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, batch, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, batch, chunk_size=0)
    with pytest.raises(ValueError, match="position_ids"):
        sequence_logprobs(model, dict(batch, position_ids=torch.zeros(3, 1, 8, dtype=torch.long)))


# ------------------------------------------------------------------------------- 2 processes (slow)
DIST_PARAMS = ("lm_head.weight", "model.visual.blocks.0.attn.qkv.weight",
               "model.language_model.layers.0.mlp.down_proj.weight")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])  # the two that shard lm_head; DDP adds nothing here
def test_two_processes_text_rank_and_image_rank(backend, media_dir, mixed_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", __file__, backend, str(media_dir), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["value_err"] <= ATOL, result
        for name in DIST_PARAMS:
            err, update = result["param_err"][name]
            assert update > 1e-4 and err <= ATOL, (name, result)


def _distributed_worker(backend: str, media_dir: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from dist_backends import BACKEND_ENV

    os.environ.update(BACKEND_ENV[backend])
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    from accelerate import Accelerator

    from vltrain.distributed import fill_deepspeed_auto

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model, _ = _fresh("qwen2_5_vl")
    text, image = _examples("qwen2_5_vl", media_dir, media_dir / "train.json", which=(0, 1))
    batches = [_padded("qwen2_5_vl", [text]), _padded("qwen2_5_vl", [image])]
    lr = 0.5

    single = copy.deepcopy(model)  # one process, both ranks' batches, gradients averaged as DDP does
    for batch in batches:
        (token_logprobs(single, batch).sum() / 2).backward()
    params = dict(single.named_parameters())
    expected = {n: params[n].detach() - lr * params[n].grad for n in DIST_PARAMS}
    updates = {n: float((lr * params[n].grad).abs().max()) for n in DIST_PARAMS}
    with torch.no_grad():
        expected_values = token_logprobs(single, batches[accelerator.process_index])

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    fill_deepspeed_auto(accelerator, model, 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    values = token_logprobs(model, batches[accelerator.process_index])
    accelerator.backward(values.sum())
    optimizer.step()
    errors = {}
    for name, p in accelerator.unwrap_model(model).named_parameters():
        if name not in DIST_PARAMS:
            continue
        if backend == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        else:
            full = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
        errors[name] = [float((full - expected[name]).abs().max()), updates[name]]
    result = {"value_err": float((values.detach() - expected_values).abs().max()), "param_err": errors}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _distributed_worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
