"""render_chat with the real Qwen3.5 / Qwen3.6 chat templates (shipped in trl's wheel) on a tiny processor:
think blocks kept in every turn ("keep"), empty blocks everywhere ("off"), labels, generation prompts,
image placeholders, and non-thinking templates passed through untouched."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vltrain.data.encode import assistant_label_mask
from vltrain.data.template import active_chat_template, is_thinking_template, render_chat
from vltrain.tiny import build_tiny_processor

THINKING_TEMPLATES = ["qwen3_5_think", "qwen3_5_nothink", "qwen3_6"]


def trl_template(name: str) -> str:
    """A chat template file from trl's wheel, read without importing trl (which needs `datasets`)."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed: the real Qwen chat templates come from its wheel "
                    "(pip install trl==1.16.0 --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "chat_templates" / f"{name}.jinja"
    assert path.is_file(), f"trl {path} missing: the tests expect trl==1.16.0"
    return path.read_text()


@functools.lru_cache(maxsize=None)
def _processor(model_type: str, template_name: str | None):
    processor = build_tiny_processor(model_type)
    if template_name is not None:
        template = trl_template(template_name)
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    return processor


def processor_for(template_name: str | None, model_type: str = "qwen3_5"):
    """The tiny processor of `model_type` with its own and its tokenizer's chat template replaced by
    trl's `template_name` (None: the tiny template)."""
    return _processor(model_type, template_name)


def text(value: str) -> list[dict]:
    return [{"type": "text", "text": value}]


USER_1 = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
USER_2 = {"role": "user", "content": text("And the shape?")}
THINK_1 = {"role": "assistant", "content": text("<think>\nThe shape is red.\n</think>\n\nred")}
THINK_2 = {"role": "assistant", "content": text("<think>\nIt has four sides.\n</think>\n\na square")}
PLAIN_1 = {"role": "assistant", "content": text("red")}
PLAIN_2 = {"role": "assistant", "content": text("a square")}

PROMPT_1 = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
PROMPT_2 = "<|im_start|>user\nAnd the shape?<|im_end|>\n"
HEADER = "<|im_start|>assistant\n"
KEPT_1 = "<think>\nThe shape is red.\n</think>\n\nred<|im_end|>"
KEPT_2 = "<think>\nIt has four sides.\n</think>\n\na square<|im_end|>"
EMPTY_1 = "<think>\n\n</think>\n\nred<|im_end|>"
EMPTY_2 = "<think>\n\n</think>\n\na square<|im_end|>"


def trained_segments(processor, rendered: str) -> list[str]:
    """The text of each run of tokens that assistant_label_mask trains, tokenized as encode does."""
    ids = processor.tokenizer(rendered, return_tensors="pt")["input_ids"][0]
    mask = assistant_label_mask(ids, processor.tokenizer).tolist()
    segments, run = [], []
    for token, trained in zip(ids.tolist(), mask):
        if trained:
            run.append(token)
        elif run:
            segments.append(processor.tokenizer.decode(run))
            run = []
    if run:
        segments.append(processor.tokenizer.decode(run))
    return segments


def test_apply_chat_template_uses_the_replaced_template_of_processor_and_tokenizer():
    processor = processor_for("qwen3_5_think")
    messages = [USER_1, THINK_1]
    from_processor = processor.apply_chat_template(messages, tokenize=False)
    assert from_processor == processor.tokenizer.apply_chat_template(messages, tokenize=False)
    assert from_processor == PROMPT_1 + HEADER + KEPT_1 + "\n"  # the tiny template would keep the text verbatim
    assert active_chat_template(processor) == trl_template("qwen3_5_think")
    assert is_thinking_template(active_chat_template(processor))


@pytest.mark.parametrize("template_name", THINKING_TEMPLATES)
def test_keep_single_turn_and_multi_turn(template_name):
    processor = processor_for(template_name)
    assert render_chat(processor, [USER_1, THINK_1], thinking="keep") == PROMPT_1 + HEADER + KEPT_1 + "\n"

    multi = [USER_1, THINK_1, USER_2, THINK_2]
    stock = processor.apply_chat_template(multi, tokenize=False)
    assert "The shape is red." not in stock  # why render_chat exists: the template drops earlier reasoning
    rendered = render_chat(processor, multi, thinking="keep")
    assert rendered == PROMPT_1 + HEADER + KEPT_1 + "\n" + PROMPT_2 + HEADER + KEPT_2 + "\n"
    assert trained_segments(processor, rendered) == [KEPT_1, KEPT_2]


def test_keep_renders_turns_without_think_as_the_template_does():
    processor = processor_for("qwen3_5_think")
    messages = [{"role": "system", "content": text("Be brief.")}, USER_1, PLAIN_1, USER_2, THINK_2]
    rendered = render_chat(processor, messages, thinking="keep")
    assert rendered == processor.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n" + PROMPT_1 + HEADER + "red<|im_end|>\n"
                        + PROMPT_2 + HEADER + KEPT_2 + "\n")
    assert trained_segments(processor, rendered) == ["red<|im_end|>", KEPT_2]

    # The earlier turn has reasoning and the last has none: the last keeps the template's empty block.
    rendered = render_chat(processor, [USER_1, THINK_1, USER_2, PLAIN_2], thinking="keep")
    assert rendered == PROMPT_1 + HEADER + KEPT_1 + "\n" + PROMPT_2 + HEADER + EMPTY_2 + "\n"


def test_keep_reads_reasoning_content_too():
    processor = processor_for("qwen3_5_think")
    with_field = {"role": "assistant", "content": text("red"), "reasoning_content": "The shape is red."}
    rendered = render_chat(processor, [USER_1, with_field, USER_2, THINK_2], thinking="keep")
    assert rendered == PROMPT_1 + HEADER + KEPT_1 + "\n" + PROMPT_2 + HEADER + KEPT_2 + "\n"


@pytest.mark.parametrize("template_name", THINKING_TEMPLATES)
def test_off_gives_every_turn_the_empty_block(template_name):
    processor = processor_for(template_name)
    assert render_chat(processor, [USER_1, PLAIN_1], thinking="off") == PROMPT_1 + HEADER + EMPTY_1 + "\n"

    multi = [USER_1, PLAIN_1, USER_2, PLAIN_2]
    rendered = render_chat(processor, multi, thinking="off")
    assert rendered == PROMPT_1 + HEADER + EMPTY_1 + "\n" + PROMPT_2 + HEADER + EMPTY_2 + "\n"
    assert trained_segments(processor, rendered) == [EMPTY_1, EMPTY_2]

    empty_in_data = {"role": "assistant", "content": text("<think>\n\n</think>\n\nred")}
    assert render_chat(processor, [USER_1, empty_in_data, USER_2, PLAIN_2], thinking="off") == rendered


def test_off_refuses_reasoning_in_the_data_naming_sample_and_turn():
    processor = processor_for("qwen3_5_think")
    with pytest.raises(ValueError, match=r"sample 's7', assistant turn 1 \(message 3\).*thinking='off'"):
        render_chat(processor, [USER_1, PLAIN_1, USER_2, THINK_2], thinking="off", sample_id="s7")


@pytest.mark.parametrize("template_name", THINKING_TEMPLATES)
def test_generation_prompt_follows_the_mode(template_name):
    processor = processor_for(template_name)
    history = [USER_1, THINK_1, USER_2]
    keep = render_chat(processor, history, thinking="keep", add_generation_prompt=True)
    assert keep == PROMPT_1 + HEADER + KEPT_1 + "\n" + PROMPT_2 + HEADER + "<think>\n"
    history = [USER_1, PLAIN_1, USER_2]
    off = render_chat(processor, history, thinking="off", add_generation_prompt=True)
    assert off == PROMPT_1 + HEADER + EMPTY_1 + "\n" + PROMPT_2 + HEADER + "<think>\n\n</think>\n\n"
    # the prompt is the training text of the history plus the header, in both modes
    assert off.startswith(render_chat(processor, history, thinking="off"))


def test_image_placeholders_expand_and_stay_untrained(media_dir):
    processor = processor_for("qwen3_5_think")
    rendered = render_chat(processor, [USER_1, THINK_1, USER_2, THINK_2], thinking="keep")
    image = Image.open(media_dir / "a.png").convert("RGB")
    out = processor(text=[rendered], images=[image], return_tensors="pt")
    ids = out["input_ids"][0]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    num_image_tokens = int(out["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    assert num_image_tokens > 1 and int((ids == image_pad).sum()) == num_image_tokens
    mask = assistant_label_mask(ids, processor.tokenizer)
    assert not mask[ids == image_pad].any()
    assert processor.tokenizer.decode(ids[mask]) == KEPT_1 + KEPT_2


@pytest.mark.parametrize("template_name", THINKING_TEMPLATES)
def test_completions_extend_the_generation_prompt(template_name):
    # encode_completions relies on this: history + reply renders as the generation prompt + the reply.
    processor = processor_for(template_name)
    history = [USER_1, THINK_1, USER_2]
    prompt = render_chat(processor, history, thinking="keep", add_generation_prompt=True)
    generated = {"role": "assistant", "content": text("It has four sides.\n</think>\n\na square")}  # after <think>\n
    full = render_chat(processor, history + [generated], thinking="keep")
    assert full == prompt + "It has four sides.\n</think>\n\na square<|im_end|>\n"

    history = [USER_1, PLAIN_1, USER_2]
    prompt = render_chat(processor, history, thinking="off", add_generation_prompt=True)
    assert render_chat(processor, history + [PLAIN_2], thinking="off") == prompt + "a square<|im_end|>\n"


@pytest.mark.parametrize("bad", [
    "hmm</think>red</think>",
    "<think>never closed red",
    "The answer <think>hmm</think> red",
    "<think>a</think>b<think>c</think>d",
])
def test_malformed_think_tags_name_the_sample(bad):
    processor = processor_for("qwen3_5_think")
    messages = [USER_1, {"role": "assistant", "content": text(bad)}]
    with pytest.raises(ValueError, match=r"sample 'x3', assistant turn 0 .*one block opening"):
        render_chat(processor, messages, thinking="keep", sample_id="x3")


def test_thinking_template_without_switch_keeps_and_refuses_off():
    # Qwen3-VL-Thinking's template (not shipped by trl) always opens `<think>\n` and has no
    # enable_thinking flag: built here from Qwen3.5's by removing the flag's branch.
    template, num_replaced = re.subn(r"\{%- if enable_thinking.*?\{%- endif %\}", "{{- '<think>\\n' }}",
                                     trl_template("qwen3_5_think"), flags=re.DOTALL)
    assert num_replaced == 1 and "enable_thinking" not in template
    processor = build_tiny_processor("qwen3_5")
    processor.chat_template = template
    rendered = render_chat(processor, [USER_1, THINK_1, USER_2], thinking="keep", add_generation_prompt=True)
    assert rendered == PROMPT_1 + HEADER + KEPT_1 + "\n" + PROMPT_2 + HEADER + "<think>\n"
    with pytest.raises(ValueError, match="no enable_thinking switch"):
        render_chat(processor, [USER_1, PLAIN_1], thinking="off", sample_id="a")


@pytest.mark.parametrize("model_type,template_name", [
    ("qwen2_vl", None), ("qwen3_5", None), ("qwen2_5_vl", "qwen2_5_vl"), ("qwen3_vl", "qwen3_vl"),
])
def test_non_thinking_templates_render_as_before(model_type, template_name):
    processor = processor_for(template_name, model_type)
    assert not is_thinking_template(active_chat_template(processor))
    multi = [USER_1, THINK_1, USER_2, PLAIN_2]  # think tags are plain text for these templates
    for generation_prompt in (False, True):
        before = processor.apply_chat_template(multi, tokenize=False, add_generation_prompt=generation_prompt)
        assert "The shape is red." in before
        for thinking in ("keep", "off"):
            assert render_chat(processor, multi, thinking=thinking, add_generation_prompt=generation_prompt) == before


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="data.thinking='on'"):
        render_chat(processor_for(None), [USER_1, PLAIN_1], thinking="on")
