"""Prompts for GRPO: records -> (prompt Conversation, reference answer) -> encoded prompt Example.

The upstream GRPO format, unchanged: a LLaVA record (vltrain.data.formats) whose first user turn is the
prompt and whose first assistant turn is the reference answer::

    {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nHow many?"},
                                                    {"from": "gpt", "value": "3"}], "any_column": ...}

with or without `<image>` / `<video>` placeholders (media without placeholders go before the prompt text, as
formats.py does), images and videos; OpenAI-style `messages` records work the same way. A record without an
assistant turn is a prompt without reference (its `assistant` column is None). Every other column of the
record reaches the reward functions by its own name; the reference answer reaches them as `assistant`.

Example (PromptDataset, one prompt; `vltrain.data.encode.encode_prompt`, media decoded in the loader workers):

    {"id", "input_ids" (P,), "mm_token_type_ids" (P,), media tensors, "assistant": str | None,
     "prompt": [{"role", "content": text with <image> / <video> placeholders}, ...] (what rewards see),
     "skipped": [...], **extra columns (every column of any record; None where this record lacks it)}

A prompt longer than `max_prompt_length` tokens (media included) is skipped and counted like any unusable
sample (a prompt is never cut). `collate_prompts` keeps a micro-batch as a list of Examples: the loop
generates from them and builds its own training rows (prompt + completion).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vltrain.data.dataset import RESERVED_KEYS, SkippingDataset, check_reserved, located
from vltrain.data.encode import encode_prompt, to_chat_messages
from vltrain.data.formats import Conversation, load_conversations
from vltrain.data.media import MediaOptions

PROMPT_RESERVED_KEYS = RESERVED_KEYS | {"assistant", "prompt"}


def split_prompt(conv: Conversation) -> tuple[Conversation, str | None]:
    """(the turns before the first assistant turn, that turn's text or None when there is none)."""
    first = next((i for i, t in enumerate(conv.turns) if t.role == "assistant"), None)
    if first is None:
        return conv, None
    answer = "".join(p.value for p in conv.turns[first].parts if p.kind == "text")
    return dataclasses.replace(conv, turns=conv.turns[:first]), answer


def load_prompts(path: str | Path) -> list[Conversation]:
    """Every record of a GRPO data file, validated up front (prompt-only records allowed; extra fields named like a
    key of the prompt Example refused)."""
    return [check_reserved(conv, PROMPT_RESERVED_KEYS, "prompt Example")
            for conv in load_conversations(path, require_reply=False)]


def reward_messages(conv: Conversation, system_prompt: str | None = None) -> list[dict]:
    """The prompt as the reward functions see it: messages with string content, media as placeholders."""
    out = []
    for message in to_chat_messages(conv, system_prompt):
        text = "".join(part["text"] if part["type"] == "text" else f"<{part['type']}>" for part in message["content"])
        out.append({"role": message["role"], "content": text})
    return out


class PromptDataset(SkippingDataset):
    """GRPO prompts (a data file or Conversations), encoded on access (module docstring); an unusable prompt
    (missing media, longer than `max_prompt_length`) is replaced by the next one and listed in `skipped`."""

    def __init__(self, path_or_conversations, processor, media: MediaOptions, *, max_prompt_length: int,
                 image_folder=None, system_prompt=None, thinking: str = "keep", source: str | None = None,
                 max_consecutive_skips: int = 16):
        conversations, source = self._records(path_or_conversations, load_prompts, source, "prompts")
        self.conversations = [self._checked(c, i, source) for i, c in enumerate(conversations)]
        self.path = source or self.conversations[0].source
        # every column of any record, on every Example (None where a record lacks it), so that each reward is
        # called with the same keywords on every rank and step
        self.columns = sorted({key for c in self.conversations for key in c.extra})
        self._set_options(processor, media, max_seq_length=max_prompt_length, image_folder=image_folder,
                          system_prompt=system_prompt, thinking=thinking, max_consecutive_skips=max_consecutive_skips)

    @staticmethod
    def _checked(conv: Conversation, position: int, source: str | None) -> Conversation:
        return check_reserved(located(conv, position, source), PROMPT_RESERVED_KEYS, "prompt Example")

    def encode(self, index: int) -> dict:
        prompt, answer = split_prompt(self.conversations[index])
        example = encode_prompt(prompt, self.processor, self.media, image_folder=self.image_folder,
                                system_prompt=self.system_prompt, thinking=self.thinking,
                                max_seq_length=self.max_seq_length)
        columns = {key: prompt.extra.get(key) for key in self.columns}
        return example | {"assistant": answer, "prompt": reward_messages(prompt, self.system_prompt)} | columns


def collate_prompts(examples: list[dict]) -> dict:
    """{"prompts": the Examples (their own skip records removed), "skipped": all of them, "id": [...]}."""
    skipped = [record for e in examples for record in e.get("skipped", ())]
    prompts = [{k: v for k, v in e.items() if k != "skipped"} for e in examples]
    return {"prompts": prompts, "skipped": skipped, "id": [e["id"] for e in examples]}
