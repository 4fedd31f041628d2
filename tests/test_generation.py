"""Batched generation on tiny models: left-padded batches generate what each prompt generates alone.

Greedy comparisons are made meaningful on random tiny models by a margin check: every greedy token of
the one-by-one run is also the argmax of a plain (cache-free, unpadded) forward over prompt + completion,
with a top-1 / top-2 logit gap of at least MIN_MARGIN, so float noise from padding cannot flip it and a
real padding / position bug shows up as a token mismatch.
"""

from __future__ import annotations

import copy
import functools
import socket

import pytest
import torch

from vltrain.data.formats import Conversation, Part, Turn, parse_record
from vltrain.data.media import MediaOptions
from vltrain.evaluate import exact_match_accuracy, prompt_and_answer
from vltrain.families import family_spec
from vltrain.generation import GenerationSettings, generate, left_pad_batch
from vltrain.tiny import build_tiny

from conftest import mixed_records

MIN_MARGIN = 1e-4  # padded vs unpadded fp32 forwards differ by ~1e-6 in the logits
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@functools.lru_cache(maxsize=None)
def _tiny(model_type):
    model, processor = build_tiny(model_type)
    return model.eval(), processor


def _media(model_type) -> MediaOptions:
    return MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                        video_max_pixels=64 * 64, nframes=4)


def _prompts() -> list[Conversation]:
    """text-only, one image, two images (two turns), one video: prompts of different lengths."""
    return [prompt_and_answer(parse_record(r, i))[0] for i, r in enumerate(mixed_records())]


def _run(model, processor, model_type, media_dir, convs, batch_size, **settings):
    settings = GenerationSettings(**{"max_new_tokens": NEW_TOKENS, **settings})
    return generate(model, processor, convs, settings, media=_media(model_type), image_folder=str(media_dir),
                    batch_size=batch_size, show_progress=False)


def _assert_clear_argmax(model, processor, model_type, media_dir, conv, token_ids):
    """Each of `token_ids` is the argmax of an unpadded, cache-free forward, by at least MIN_MARGIN."""
    from vltrain.data.encode import process_conversation

    inputs = dict(process_conversation(conv, processor, _media(model_type), image_folder=str(media_dir),
                                       add_generation_prompt=True))
    n = inputs["input_ids"].shape[1]
    completion = torch.tensor([token_ids])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, n - 1: n - 1 + len(token_ids)]
    assert logits.argmax(-1).tolist() == token_ids
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > MIN_MARGIN, f"near-tie (margin {margin:.2e}): the comparison would not be meaningful"


def _check_batched_equals_one_by_one(model, processor, model_type, media_dir):
    convs = _prompts()
    batched = _run(model, processor, model_type, media_dir, convs, batch_size=len(convs))
    alone = [_run(model, processor, model_type, media_dir, [c], batch_size=1)[0] for c in convs]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    for conv, g in zip(convs, alone):
        assert g.token_ids and g.finish_reason in ("stop", "length")
        assert (g.finish_reason == "length") == (len(g.token_ids) == NEW_TOKENS)
        _assert_clear_argmax(model, processor, model_type, media_dir, conv, g.token_ids)
    return batched


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_batched_equals_one_by_one(model_type, media_dir):
    model, processor = _tiny(model_type)
    _check_batched_equals_one_by_one(model, processor, model_type, media_dir)


def test_left_padding_is_masked_and_media_follow_prompt_order(media_dir):
    """The batch really is left-padded, and the padding matters: unmasked pads change the output."""
    model, processor = _tiny("qwen2_5_vl")
    from vltrain.data.encode import process_conversation

    prompts = [process_conversation(c, processor, _media("qwen2_5_vl"), image_folder=str(media_dir),
                                    add_generation_prompt=True) for c in _prompts()]
    pad = processor.tokenizer.pad_token_id
    batch = left_pad_batch(prompts, pad)
    lengths = [p["input_ids"].shape[1] for p in prompts]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, p in enumerate(prompts):
        assert torch.equal(batch["input_ids"][row, -lengths[row]:], p["input_ids"][0])
        assert (batch["input_ids"][row, : max(lengths) - lengths[row]] == pad).all()
    assert torch.equal(batch["pixel_values"], torch.cat([prompts[1]["pixel_values"], prompts[2]["pixel_values"]]))
    assert torch.equal(batch["video_grid_thw"], prompts[3]["video_grid_thw"])
    with torch.no_grad():
        masked = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        unmasked = model.generate(**{**batch, "attention_mask": torch.ones_like(batch["attention_mask"])},
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    assert not torch.equal(masked, unmasked)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_5"])
def test_generation_after_packed_training(model_type, media_dir, mixed_data):
    from vltrain.attention import ATTN_NAME, enable_packed_attention
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.packing import PackCollator

    model, processor = build_tiny(model_type)
    enable_packed_attention(model)
    ds = SFTDataset(mixed_data, processor, _media(model_type), max_seq_length=1024, image_folder=str(media_dir))
    batch = {k: v for k, v in PackCollator(model)([ds[i] for i in range(len(ds))]).items()
             if k in ("input_ids", "labels", "mm_token_type_ids", "position_ids") or k.startswith(("pixel", "image",
                                                                                                  "video", "second"))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        before = model(**batch).loss

    _check_batched_equals_one_by_one(model, processor, model_type, media_dir)

    assert model.training  # generate restores the mode
    assert model.config.text_config._attn_implementation == ATTN_NAME and not model.config.text_config.use_cache
    with torch.no_grad():
        after = model(**batch).loss
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # packed numerics, linear attention included
    model(**batch).loss.backward()
    optimizer.step()
    ids = batch["input_ids"].clone()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="must not be padded"):  # the packed attention is back
        model(input_ids=ids, attention_mask=mask)


def test_lora_model_generates_with_its_adapters(media_dir):
    from vltrain.config import LoraConfig, TrainableConfig
    from vltrain.lora import apply_lora
    from vltrain.trainable import configure_trainable

    model_type = "qwen2_5_vl"
    base, processor = _tiny(model_type)
    lora = copy.deepcopy(base)
    configure_trainable(lora, TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True),
                        adapters_follow=True)
    lora = apply_lora(lora, LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    merged = copy.deepcopy(lora).merge_and_unload()
    convs = _prompts()[:2]
    got = _run(lora, processor, model_type, media_dir, convs, batch_size=2)
    want = _run(merged, processor, model_type, media_dir, convs, batch_size=2)
    plain = _run(base, processor, model_type, media_dir, convs, batch_size=2)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.token_ids for g in got] != [g.token_ids for g in plain]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(media_dir):
    model, processor = _tiny("qwen2_vl")
    convs = _prompts()[:2]
    state = torch.get_rng_state()
    runs = [_run(model, processor, "qwen2_vl", media_dir, convs, 2, temperature=1.5, top_k=100, seed=seed)
            for seed in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    assert [g.token_ids for g in runs[0]] != [g.token_ids for g in runs[2]]
    greedy = _run(model, processor, "qwen2_vl", media_dir, convs, 2)
    assert [g.token_ids for g in runs[0]] != [g.token_ids for g in greedy]
    _run(model, processor, "qwen2_vl", media_dir, convs, 2, temperature=1.0)  # seed=None: the global RNG
    assert not torch.equal(torch.get_rng_state(), state)


def test_stop_strings_cut_the_text(media_dir):
    model, processor = _tiny("qwen2_vl")
    convs = _prompts()[:1]
    full = _run(model, processor, "qwen2_vl", media_dir, convs, 1, max_new_tokens=12)[0]
    assert len(full.text) >= 6, full.text
    stop = full.text[3:5]
    end = full.text.find(stop) + len(stop)
    cut = _run(model, processor, "qwen2_vl", media_dir, convs, 1, max_new_tokens=12, stop_strings=[stop, "\x00zz"])[0]
    assert cut.text == full.text[:end] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert stop not in processor.tokenizer.decode(cut.token_ids[:-1])  # stopped on the token completing it


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("min_p", 1.5), ("repetition_penalty", 0.0), ("stop_strings", "</s>"), ("stop_strings", [""]),
    ("seed", -3), ("seed", 1.5),
])
def test_settings_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"GenerationSettings.{field} "):
        GenerationSettings(**{field: value})


def test_a_prompt_ending_with_the_reply_is_refused(media_dir):
    model, processor = _tiny("qwen2_vl")
    whole = parse_record(mixed_records()[0], 0)
    with pytest.raises(ValueError, match="sample 'text'"):
        _run(model, processor, "qwen2_vl", media_dir, [whole], 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_synced_generation_matches_plain(model_type, media_dir):
    """The sharded-parameter path (synced_gpus, dummy image / video rows) on a one-process gloo group:
    batches of one prompt need a dummy image, a dummy video or both, and no real completion changes."""
    model, processor = _tiny(model_type)
    convs = _prompts()
    plain = _run(model, processor, model_type, media_dir, convs, batch_size=4)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
        synced = generate(model, processor, convs, settings, media=_media(model_type), image_folder=str(media_dir),
                          batch_size=1, show_progress=False)  # synced_gpus=None: auto, False at world size 1
        assert [g.token_ids for g in synced] == [g.token_ids for g in plain]
        synced = generate(model, processor, convs, settings, media=_media(model_type), image_folder=str(media_dir),
                          batch_size=1, show_progress=False, synced_gpus=True)
    finally:
        torch.distributed.destroy_process_group()
    assert [g.token_ids for g in synced] == [g.token_ids for g in plain]


def test_dummy_media_row_leaves_the_real_rows(media_dir):
    from vltrain.data.encode import process_conversation
    from vltrain.generation import add_dummy_media_row

    model, processor = _tiny("qwen3_vl")
    prompts = [process_conversation(c, processor, _media("qwen3_vl"), image_folder=str(media_dir),
                                    add_generation_prompt=True) for c in _prompts()[:2]]
    batch = left_pad_batch(prompts, processor.tokenizer.pad_token_id)
    grown, added = add_dummy_media_row(model, batch, processor.tokenizer.pad_token_id)
    assert added and grown["input_ids"].shape[0] == 3 and "pixel_values_videos" in grown
    assert torch.equal(grown["pixel_values"], batch["pixel_values"])  # the real images keep their order
    with torch.no_grad():
        want = model(**batch).logits
        got = model(**grown).logits[:2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert add_dummy_media_row(model, grown, 0) == (grown, False)


def test_exact_match_accuracy_batched(media_dir):
    model, processor = _tiny("qwen2_vl")
    prompts = _prompts()
    replies = _run(model, processor, "qwen2_vl", media_dir, prompts, 4, max_new_tokens=4)
    convs = []
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        answer = f"  {reply.text.strip()} " if i % 2 == 0 else reply.text.strip() + " wrong"
        convs.append(Conversation(prompt.sample_id, prompt.turns + [Turn("assistant", [Part("text", answer)])]))
    accuracy, records = exact_match_accuracy(model, processor, convs, _media("qwen2_vl"), image_folder=str(media_dir),
                                             max_new_tokens=4, show_progress=False, batch_size=3)
    assert accuracy == 0.5
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert [r["reply"] for r in records] == [g.text.strip() for g in replies]



def test_sft_recipe_with_packing_reports_exact_match(tmp_path, mixed_data):
    """recipes.sft trains packed, then evaluates the same instance through generate (batched)."""
    import json

    from recipes.sft import main

    from conftest import sft_config

    cfg = sft_config(tmp_path, "qwen2_5_vl", mixed_data, **{
        "data.packing": True, "data.max_tokens_per_batch": 1024, "train.max_steps": 4,
        "data.eval_path": str(mixed_data), "train.eval_exact_match": 4})
    summary = main(cfg)
    records = [json.loads(line) for line in (tmp_path / "out" / "exact_match.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["text", "img", "multi", "vid"]
    assert summary["exact_match"] == sum(r["correct"] for r in records) / 4
    assert all(r["finish_reason"] in ("stop", "length") and r["answer"] for r in records)
    assert records[2]["answer"] == "a square"  # the last assistant turn is the reference

# ------------------------------------------------------------------------------ DeepSpeed ZeRO-3, 2 ranks
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 1e9,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # shard every parameter


def _zero3_rank(media_dir: str, out: str) -> None:
    """One rank of test_zero3_ranks_generate_their_own_prompts (run by torchrun): rank 0 gets the text-only
    prompt (one batch), rank 1 the three media prompts (two batches), so rank 0 must keep rank 1's
    forwards company with a dummy batch, and every batch needs dummy media rows."""
    import json

    import deepspeed

    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    model, processor = build_tiny("qwen2_5_vl")
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3)
    module = engine.module
    sharded = all(p.numel() == 0 for p in module.parameters())
    convs = _prompts()
    mine = convs[:1] if rank == 0 else convs[1:]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    got = generate(module, processor, mine, settings, media=_media("qwen2_5_vl"), image_folder=media_dir,
                   batch_size=2, show_progress=False)  # synced_gpus auto: sharded, 2 ranks -> True
    result = {"sharded": sharded, "token_ids": [g.token_ids for g in got]}
    if rank == 0:  # an unsharded model on the main process alone (as under DDP): auto must not wait for rank 1
        plain, _ = build_tiny("qwen2_5_vl")
        alone = generate(plain, processor, convs, settings, media=_media("qwen2_5_vl"), image_folder=media_dir,
                         batch_size=4, show_progress=False)
        result["alone"] = [g.token_ids for g in alone]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_zero3_ranks_generate_their_own_prompts(media_dir, tmp_path):
    """2 CPU ranks under DeepSpeed ZeRO-3 (every parameter sharded), different numbers of prompts and
    modalities per rank: no hang, and each rank's completions are what the unsharded model generates.
    Then rank 0 alone generates with an unsharded model (the DDP case) while rank 1 waits: no hang."""
    import json
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    model, processor = _tiny("qwen2_5_vl")  # build_tiny(seed 0): the weights every rank starts from
    want = [g.token_ids for g in _run(model, processor, "qwen2_5_vl", media_dir, _prompts(), batch_size=4)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           __file__, str(media_dir), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ZeRO-3 generation hung (> 180 s): {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] for r in ranks)
    assert ranks[0]["token_ids"] == want[:1] and ranks[1]["token_ids"] == want[1:]
    assert ranks[0]["alone"] == want


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    _zero3_rank(sys.argv[1], sys.argv[2])
