"""Rendering a conversation's chat-template text: the one place encode and generation call the template.

    text = render_chat(processor, messages, thinking="keep", add_generation_prompt=False, sample_id="42")

Thinking models (Qwen3-VL-Thinking, Qwen3.5 >= 4B) render an assistant turn as
`<|im_start|>assistant\\n<think>\\n...\\n</think>\\n\\nanswer<|im_end|>`, but their stock templates
render the think block only for assistant turns after the last user query: earlier turns lose their
reasoning (right for an inference history, wrong for a training target). `data.thinking` says what
the trained text is:

* "keep": an assistant turn whose text opens with `<think>...</think>` (or `...</think>`, a
  completion generated after the thinking prompt, or that carries a `reasoning_content` string,
  see `turn_reasoning`) is rendered exactly as the template renders that turn when it is the
  last one, so its reasoning is trained in EVERY turn. A turn without a think block is rendered as
  the stock template renders it. The generation prompt is the thinking one (`enable_thinking=True`,
  also for the small Qwen3.5 whose template defaults to non-thinking).
* "off": every assistant turn is rendered as the template renders a last turn without reasoning,
  i.e. with the template's empty block `<think>\\n\\n</think>\\n\\n` before the answer; the
  generation prompt is the non-thinking one (`enable_thinking=False`). Reasoning text in the data
  is an error naming the sample and turn, never dropped silently: training answers without their
  reasoning is a decision to make in the data (an empty `<think>\\n\\n</think>` block is accepted).
  A thinking template without an `enable_thinking` switch (Qwen3-VL-Thinking) has no non-thinking
  mode to match at generation, so "off" is refused for it.

How a turn is re-rendered: the template renders `messages[:k+1]` (turn k last, hence after the last
query), and that rendering's final assistant body replaces turn k's body in the stock rendering of
the whole conversation. Bodies are delimited as `assistant_label_mask` in encode.py delimits labels
(after `<|im_start|>assistant\\n` through the next `<|im_end|>`), so only assistant text changes and
system / user turns and media placeholders stay exactly what the stock template writes.

A template is a thinking template when its text contains `<think>`; any other template (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL Instruct, the tiny test templates) is called as before, in both modes, and
think tags in its data are plain text.
"""

from __future__ import annotations

THINKING_MODES = ("keep", "off")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"


# Named system prompts (`data.system_prompt: builtin:<name>`); any other value is the literal text.
SYSTEM_PROMPTS = {
    "think_answer": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
    ),
}


def resolve_system_prompt(value: str | None) -> str | None:
    """`builtin:<name>` -> the named prompt of SYSTEM_PROMPTS; anything else (or None) unchanged."""
    if value is None or not value.startswith("builtin:"):
        return value
    name = value.removeprefix("builtin:")
    if name not in SYSTEM_PROMPTS:
        raise ValueError(f"data.system_prompt={value!r}: the built-in system prompts are "
                         f"{', '.join('builtin:' + k for k in SYSTEM_PROMPTS)}")
    return SYSTEM_PROMPTS[name]


def active_chat_template(processor) -> str | None:
    """The template text `processor.apply_chat_template` renders with (a processor's own, or a
    tokenizer's); None when it has none."""
    template = getattr(processor, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template


def is_thinking_template(template: str | None) -> bool:
    """True for templates that write `<think>` blocks (Qwen3-VL-Thinking, Qwen3.5, Qwen3.6)."""
    return template is not None and THINK_OPEN in template


def turn_reasoning(message: dict, where: str) -> str | None:
    """The reasoning of one assistant message: the text of a leading `<think>...</think>` block (or
    its `reasoning_content` string), stripped; '' for an empty block; None when it has none.

    A text with one `</think>` and no `<think>` is reasoning too: a completion generated after the
    thinking prompt `...assistant\n<think>\n` starts inside the block (the templates parse it so).
    Think tags anywhere else, unclosed, or repeated raise ValueError naming `where`: the stock
    templates would split such text at the first `</think>` and drop part of it."""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    else:
        text = "".join(item.get("text", "") for item in content or [] if isinstance(item, dict))
    text = text.strip()
    num_open, num_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    reasoning_content = message.get("reasoning_content")
    if isinstance(reasoning_content, str):
        if num_open or num_close:
            raise ValueError(f"{where}: has both a reasoning_content field and think tags in its text; give one")
        return reasoning_content.strip()
    if num_open == 0 and num_close == 0:
        return None
    if num_close != 1 or num_open > 1 or (num_open == 1 and not text.startswith(THINK_OPEN)):
        raise ValueError(
            f"{where}: think tags must be one block opening the turn's text, '<think>...</think>answer' "
            f"(found {num_open} '<think>' and {num_close} '</think>' in {text[:60]!r})"
        )
    return text[len(THINK_OPEN) if num_open else 0 : text.index(THINK_CLOSE)].strip()


def assistant_bodies(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of every assistant body in rendered `text`: after
    `<|im_start|>assistant\\n` through the next `<|im_end|>` included (to the end if unclosed)."""
    spans = []
    i = text.find(ASSISTANT_HEADER)
    while i != -1:
        start = i + len(ASSISTANT_HEADER)
        close = text.find(IM_END, start)
        end = len(text) if close == -1 else close + len(IM_END)
        spans.append((start, end))
        i = text.find(ASSISTANT_HEADER, end)
    return spans


def render_chat(processor, messages: list[dict], *, thinking: str = "keep", add_generation_prompt: bool = False,
                sample_id: str | None = None, source: str | None = None) -> str:
    """The chat-template text of `messages` (typed-content chat messages, as
    `vltrain.data.encode.to_chat_messages` builds them) under `thinking` ("keep" | "off", the config
    field data.thinking). `sample_id` and `source` (its data file) only name the sample in errors."""
    if thinking not in THINKING_MODES:
        raise ValueError(f"data.thinking={thinking!r} is not one of {', '.join(THINKING_MODES)}")
    template = active_chat_template(processor)
    if not is_thinking_template(template):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    where = f"sample {sample_id!r}" if sample_id is not None else "messages"
    if source is not None:
        where = f"{source}: {where}"
    has_switch = "enable_thinking" in template
    if thinking == "off" and not has_switch:
        raise ValueError(
            f"data.thinking='off': the chat template of {type(processor).__name__} ({where}) writes <think> blocks "
            "but has no enable_thinking switch (e.g. Qwen3-VL-Thinking), so no non-thinking prompt exists; "
            "use data.thinking='keep' or a model with a non-thinking mode"
        )
    flags = {"enable_thinking": thinking == "keep"} if has_switch else {}

    def stock(msgs, generation_prompt=False):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **flags)

    assistant_indices = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    rerender = []
    for turn, k in enumerate(assistant_indices):
        reasoning = turn_reasoning(messages[k], f"{where}, assistant turn {turn} (message {k})")
        if thinking == "off" and reasoning:
            raise ValueError(
                f"{where}, assistant turn {turn} (message {k}): data.thinking='off' trains non-thinking answers "
                f"but this turn has reasoning ({reasoning[:40]!r}...); remove it from the data or use "
                "data.thinking='keep'"
            )
        if thinking == "off" or reasoning is not None:
            rerender.append((turn, k))

    text = stock(messages)
    spans = assistant_bodies(text)
    if len(spans) != len(assistant_indices):
        raise ValueError(
            f"{where}: the chat template wrote {len(spans)} assistant headers for {len(assistant_indices)} "
            f"assistant messages; does a message's text contain {ASSISTANT_HEADER!r}?"
        )
    pieces, cursor = [], 0
    for turn, k in rerender:
        alone = text if k == len(messages) - 1 else stock(messages[: k + 1])
        start, end = assistant_bodies(alone)[-1]
        pieces += [text[cursor : spans[turn][0]], alone[start:end]]
        cursor = spans[turn][1]
    pieces.append(text[cursor:])
    rendered = "".join(pieces)

    if add_generation_prompt:
        prompted = stock(messages, generation_prompt=True)
        if not prompted.startswith(text):
            raise ValueError(f"{where}: this chat template changes earlier turns when it adds the generation prompt")
        rendered += prompted[len(text) :]
    return rendered
