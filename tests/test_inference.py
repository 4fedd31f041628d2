"""vltrain.inference.load_trained: what serve and generate load -- a full export, a run folder, a LoRA export on its
base (with or without merged/), 4/8-bit weights -- with the media limits and system prompt the run was trained with."""

import pytest
import torch

from conftest import sft_config


def _logits(model, processor, text="What colour?"):
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA SFT run (adapters, trained merger, merged/ written), 4 steps, with a system prompt and pixel limits."""
    import json

    from conftest import mixed_records, write_image, write_video
    from recipes.sft import main

    tmp = tmp_path_factory.mktemp("lora_run")
    write_image(tmp / "a.png", (64, 64), seed=1)
    write_image(tmp / "b.png", (96, 64), seed=2)
    write_video(tmp / "clip.mp4")
    (tmp / "train.json").write_text(json.dumps(mixed_records()))
    cfg = sft_config(tmp, "qwen2_5_vl", tmp / "train.json", **{
        "lora.enabled": True, "trainable.freeze_llm": True, "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0,
        "lora.merge_on_export": True, "train.max_steps": 4, "data.system_prompt": "You are terse.",
        "data.image_max_pixels": 3136})
    summary = main(cfg)
    return tmp / "out", summary


def test_full_export_and_its_run_folder_load_the_same_model_with_its_training_settings(tmp_path, mixed_data):
    from recipes.sft import main
    from vltrain.inference import load_trained

    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{"train.max_steps": 2, "data.image_max_pixels": 5000,
                                                         "data.nframes": 6, "data.system_prompt": "builtin:think_answer"})
    main(cfg)
    export = load_trained(tmp_path / "out" / "final", device="cpu")
    run = load_trained(tmp_path / "out", device="cpu")
    assert export.weights == run.weights == tmp_path / "out" / "final"
    assert not export.model.training and export.model.config.model_type == "qwen2_vl"
    assert export.media.image_max_pixels == 5000 and export.media.nframes == 6 and export.media.image_factor == 28
    assert export.system_prompt.startswith("A conversation between User and Assistant")  # builtin: resolved
    assert export.image_folder == str(mixed_data.parent)
    torch.testing.assert_close(_logits(export.model, export.processor), _logits(run.model, run.processor))
    assert export.generate_kwargs() == {"media": export.media, "image_folder": export.image_folder,
                                        "system_prompt": export.system_prompt}


def test_a_lora_export_loads_merged_or_as_adapter_on_its_base_with_the_same_outputs(lora_run):
    from vltrain.inference import load_trained

    out, summary = lora_run
    final = out / "final"
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "merged" / "config.json").is_file()
    merged = load_trained(final, device="cpu")
    assert merged.weights == final / "merged" and not hasattr(merged.model, "peft_config")
    adapter = load_trained(final, base="tiny:qwen2_5_vl", device="cpu")  # naming the base asks for the adapter
    assert adapter.weights == final / "adapter" and hasattr(adapter.model, "peft_config")
    assert merged.system_prompt == adapter.system_prompt == "You are terse."
    assert merged.media.image_max_pixels == adapter.media.image_max_pixels == 3136
    torch.testing.assert_close(_logits(merged.model, merged.processor), _logits(adapter.model, adapter.processor),
                               atol=1e-4, rtol=1e-4)
    direct = load_trained(final / "adapter", device="cpu")  # the adapter folder itself: base from its config
    torch.testing.assert_close(_logits(direct.model, direct.processor), _logits(adapter.model, adapter.processor))


@pytest.mark.parametrize("bits", [8, 4])
def test_4_and_8_bit_weights_load_and_answer(tmp_path, mixed_data, bits):
    """--bits: the LLM's linear layers through bitsandbytes (the vision tower and LM head stay unquantized)."""
    import bitsandbytes as bnb

    from recipes.sft import main
    from vltrain.generation import GenerationSettings, generate
    from vltrain.data.formats import load_conversations
    from vltrain.evaluate import prompt_and_answer
    from vltrain.inference import load_trained

    main(sft_config(tmp_path, "qwen2_5_vl", mixed_data, **{"train.max_steps": 2}))
    full = load_trained(tmp_path / "out", device="cpu")
    quantized = load_trained(tmp_path / "out", bits=bits, device="cpu")
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    layer = quantized.model.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, kind) and isinstance(layer.mlp.down_proj, kind)
    assert not isinstance(quantized.model.lm_head, kind)
    assert not any(isinstance(m, kind) for m in quantized.model.model.visual.modules())
    a, b = _logits(full.model, full.processor), _logits(quantized.model, quantized.processor)
    assert torch.isfinite(b).all() and a.shape == b.shape and not torch.equal(a, b)
    prompts = [prompt_and_answer(c)[0] for c in load_conversations(mixed_data)[:2]]
    replies = generate(quantized.model, quantized.processor, prompts, GenerationSettings(max_new_tokens=4),
                       show_progress=False, **quantized.generate_kwargs())
    assert len(replies) == 2 and all(r.token_ids for r in replies)


def test_what_is_not_a_model_is_one_line(tmp_path):
    from vltrain.inference import load_trained

    with pytest.raises(ValueError, match="no such folder"):
        load_trained(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_trained(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        load_trained(tmp_path / "empty")
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16"):
        load_trained(tmp_path / "empty", bits=2)
