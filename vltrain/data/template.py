"""Rendering a conversation's chat-template text: the one place encode and generation call the template.

    text = render_chat(processor, messages, thinking="keep", add_generation_prompt=False)
"""

from __future__ import annotations


def render_chat(processor, messages: list[dict], *, thinking: str = "keep", add_generation_prompt: bool = False) -> str:
    """The chat-template text of `messages` (typed-content chat messages)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
