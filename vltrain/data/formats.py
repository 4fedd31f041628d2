"""Records -> validated conversations.

Accepted record shapes (one JSON list file, or JSONL with one record per line):

* LLaVA (the upstream format, unchanged)::

    {"id": "1", "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4" | [...],
     "system": "optional per-sample system prompt",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A bus."}]}

  `<image>` / `<video>` placeholders are consumed in order across turns; a record whose text has no
  placeholders gets its media at the start of the first user turn. A newline next to a placeholder is
  dropped (it belonged to the placeholder).

* OpenAI-style messages with typed content::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}]}

  (`image_url: {"url": ...}` and `video` parts are accepted too; a top-level "system" string works as in
  LLaVA records.)

Conversation shape, checked for every record: an optional leading system turn, then user and assistant
turns alternating, starting with a user turn and (unless the caller asks for prompt-only records with
`require_reply=False`: generation, GRPO) ending with an assistant turn. No turn may be empty (no text
and no media); media only in user turns (labels would otherwise cover media tokens); no text may hold a
token the chat template writes itself (`CONTROL_TOKENS`: an `<|im_end|>` in a reply would end the trained
answer early). `id` is a string or an integer. Errors name the file, sample index, sample id and the turn
index (0-based, as in the record's `conversations` / `messages` list).

Every other top-level key of a record (reward columns, class labels, pair ids, ...) is kept in
`Conversation.extra`, untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PartKind = Literal["text", "image", "video"]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER = re.compile(r"\n?(<image>|<video>)\n?")
# Tokens the chat template and the processor write themselves: in a record's text they would end a turn early
# (labels stop at the first <|im_end|>), or claim media the sample does not have.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_LLAVA_KEYS = ("id", "image", "video", "system", "conversations")
_MESSAGES_KEYS = ("id", "system", "messages")


class DataFormatError(ValueError):
    """A record that cannot be read; the message names the file, sample and field."""


@dataclass
class Part:
    kind: PartKind
    value: str  # text, or a media reference (path / URL)


@dataclass
class Turn:
    role: Literal["system", "user", "assistant"]
    parts: list[Part] = field(default_factory=list)

    def is_empty(self) -> bool:
        """No media and no text but whitespace."""
        return not any(p.kind != "text" or p.value.strip() for p in self.parts)


@dataclass
class Conversation:
    sample_id: str
    turns: list[Turn]
    extra: dict = field(default_factory=dict)  # the record's top-level keys that are not part of the format
    # Where the record came from, for skip / truncation reports; not part of equality.
    source: str = field(default="data", compare=False)
    index: int | None = field(default=None, compare=False)

    @property
    def has_reply(self) -> bool:
        """Ends with an assistant turn (trainable); False for a prompt-only record."""
        return self.turns[-1].role == "assistant"

    @property
    def images(self) -> list[str]:
        return [p.value for t in self.turns for p in t.parts if p.kind == "image"]

    @property
    def videos(self) -> list[str]:
        return [p.value for t in self.turns for p in t.parts if p.kind == "video"]


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or a JSONL file (UTF-8, a byte-order mark allowed), as a list of dicts; errors name the file
    and line."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"data file {str(path)!r} is a folder, not a JSON / JSONL file")
    if not path.is_file():
        raise DataFormatError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not a UTF-8 text file, so not JSON / JSONL (byte {e.start}: {e.reason})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if stripped.startswith("{") and _is_one_object(text):
                    raise DataFormatError(f"{path}: holds one JSON object, not a list of records; a data file is "
                                          "a JSON list of records or JSONL (one record per line)") from None
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: a JSON file must hold a list of records, got a {type(records).__name__}")
    if not records:
        raise DataFormatError(f"{path}: the data file holds no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
    return records


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _as_list(value, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataFormatError(f"{where}: field {name!r} must be a string or a list of strings, got {value!r}")


def _split_placeholders(text: str, images: list[str], videos: list[str], where: str) -> list[Part]:
    parts: list[Part] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > pos:
            parts.append(Part("text", text[pos : match.start()]))
        queue, kind = (images, "image") if match.group(1) == "<image>" else (videos, "video")
        if not queue:
            raise DataFormatError(f"{where}: more {match.group(1)} placeholders than {kind} files in the record")
        parts.append(Part(kind, queue.pop(0)))
        pos = match.end()
    if pos < len(text):
        parts.append(Part("text", text[pos:]))
    return parts


def _from_llava(record: dict, where: str) -> list[Turn]:
    turns_in = record["conversations"]
    if not isinstance(turns_in, list) or not turns_in:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list")
    images = _as_list(record.get("image"), "image", where)
    videos = _as_list(record.get("video"), "video", where)
    num_images, num_videos = len(images), len(videos)
    has_placeholders = any(
        isinstance(t, dict) and isinstance(t.get("value"), str) and _PLACEHOLDER.search(t["value"]) for t in turns_in
    )
    turns: list[Turn] = []
    for j, turn in enumerate(turns_in):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(f"{where}: conversations[{j}] needs 'from' and 'value'")
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataFormatError(f"{where}: conversations[{j}].from={turn['from']!r} is not one of {sorted(_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataFormatError(f"{where}: conversations[{j}].value must be a string")
        turns.append(Turn(role, _split_placeholders(turn["value"], images, videos, f"{where} conversations[{j}]")))
    if has_placeholders and (images or videos):
        raise DataFormatError(
            f"{where}: the record lists {num_images} image(s) and {num_videos} video(s) but its text has only "
            f"{num_images - len(images)} <image> and {num_videos - len(videos)} <video> placeholders"
        )
    if images or videos:  # no placeholders at all: media go first in the first user turn
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:  # without a user turn the shape check rejects the record
            first_user.parts[:0] = [Part("video", v) for v in videos] + [Part("image", i) for i in images]
    return turns


def _from_messages(record: dict, where: str) -> list[Turn]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for j, message in enumerate(messages):
        at = f"{where} messages[{j}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(f"{at}: needs 'role' and 'content'")
        role = _ROLES.get(str(message["role"]).lower())
        if role is None:
            raise DataFormatError(f"{at}: role={message['role']!r} is not one of system/user/assistant")
        content = message["content"]
        if isinstance(content, str):
            turns.append(Turn(role, [Part("text", content)]))
            continue
        if not isinstance(content, list):
            raise DataFormatError(f"{at}: content must be a string or a list of typed parts")
        parts = []
        for k, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                parts.append(Part("text", item["text"]))
            elif kind in ("image", "image_url"):
                ref = item.get("image") or item.get("url") or item.get("path")
                if isinstance(item.get("image_url"), dict):
                    ref = item["image_url"].get("url")
                elif isinstance(item.get("image_url"), str):
                    ref = item["image_url"]
                if not isinstance(ref, str):
                    raise DataFormatError(f"{at}.content[{k}]: image part without a path/url")
                parts.append(Part("image", ref))
            elif kind in ("video", "video_url"):
                ref = item.get("video") or item.get("url") or item.get("path")
                if isinstance(item.get("video_url"), dict):
                    ref = item["video_url"].get("url")
                if not isinstance(ref, str):
                    raise DataFormatError(f"{at}.content[{k}]: video part without a path/url")
                parts.append(Part("video", ref))
            else:
                raise DataFormatError(f"{at}.content[{k}]: unknown part {item!r} (expected text/image/video)")
        turns.append(Turn(role, parts))
    return turns


def control_token(text: str) -> str | None:
    """The first of `CONTROL_TOKENS` that `text` holds, or None."""
    return next((token for token in CONTROL_TOKENS if token in text), None)


def check_text(text: str, at: str) -> None:
    """DataFormatError naming `at` when `text` holds a token the chat template writes itself (`CONTROL_TOKENS`)."""
    token = control_token(text)
    if token is not None:
        raise DataFormatError(f"{at}: the text holds {token!r}, a token the chat template writes itself; remove it "
                              "from the data (pre-rendered chat text is not a conversation)")


def _check_shape(turns: list[Turn], where: str, require_reply: bool) -> None:
    """Optional system turn, then user/assistant alternating from a user turn; media only in user turns; no
    control token in the text; indices as in the record."""
    for j, turn in enumerate(turns):
        at = f"{where} turn {j}"
        if turn.is_empty():
            raise DataFormatError(f"{at}: empty {turn.role} turn (no text and no media)")
        media = next((p.kind for p in turn.parts if p.kind != "text"), None)
        if media is not None and turn.role != "user":
            raise DataFormatError(f"{at}: the {turn.role} turn holds {'an' if media == 'image' else 'a'} {media}; "
                                  "media belong in user turns (the model reads them, it does not write them)")
        for part in turn.parts:
            if part.kind == "text":
                check_text(part.value, at)
        if turn.role == "system":
            if j > 0:
                raise DataFormatError(f"{at}: a system turn may only come first")
            continue
        previous = turns[j - 1].role if j > 0 else "system"
        if previous == "system" and turn.role == "assistant":
            raise DataFormatError(f"{at}: starts with an assistant turn; a conversation starts with a user turn "
                                  "(after an optional system turn)")
        if previous == turn.role:
            raise DataFormatError(f"{at}: two {turn.role} turns in a row")
    if all(t.role == "system" for t in turns):
        raise DataFormatError(f"{where} turn {len(turns) - 1}: only a system turn, no user turn")
    if require_reply and turns[-1].role != "assistant":
        raise DataFormatError(f"{where} turn {len(turns) - 1}: ends with a user turn, so no assistant turn answers it "
                              "(prompt-only records are for generation / GRPO)")


def record_id(record: dict, index: int, source: str) -> str:
    """The record's `id` as a string (its index when it has none); a DataFormatError names any other type."""
    value = record.get("id", index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{source}: sample {index}: field 'id' must be a string or an integer, got {value!r}")
    return str(value)


def parse_record(record: dict, index: int, source: str = "data", *, require_reply: bool = True) -> Conversation:
    """Validate one record of either format; the error names `source`, the index, the id and the turn.

    `require_reply=False` accepts prompt-only records (ending with a user turn) for generation and GRPO.
    """
    sample_id = record_id(record, index, source)
    where = f"{source}: sample {index} (id={sample_id!r})"
    if "conversations" in record and "messages" in record:
        raise DataFormatError(f"{where}: both 'conversations' and 'messages'; a record uses one format")
    if "conversations" in record:
        turns, format_keys = _from_llava(record, where), _LLAVA_KEYS
    elif "messages" in record:
        media_fields = [k for k in ("image", "video") if k in record]
        if media_fields:
            raise DataFormatError(f"{where}: field {media_fields[0]!r} belongs to LLaVA records; a 'messages' record "
                                  "gives its media as typed content parts")
        turns, format_keys = _from_messages(record, where), _MESSAGES_KEYS
    else:
        raise DataFormatError(f"{where}: needs 'conversations' (LLaVA) or 'messages' (OpenAI style)")
    _check_shape(turns, where, require_reply)
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataFormatError(f"{where}: field 'system' must be a string")
        check_text(system, f"{where}: field 'system'")
        if turns[0].role == "system":
            raise DataFormatError(f"{where}: both a 'system' field and a system turn")
        if system.strip():  # an empty field means "no per-sample system prompt", not an empty system turn
            turns.insert(0, Turn("system", [Part("text", system)]))
    extra = {k: v for k, v in record.items() if k not in format_keys}
    return Conversation(sample_id, turns, extra, source=str(source), index=index)


def load_conversations(path: str | Path, *, require_reply: bool = True) -> list[Conversation]:
    """Every record of a data file, validated up front so a bad one fails before training starts.

    `require_reply=False` also accepts prompt-only records (see `parse_record`). An extra field named like a key
    every Example builds (vltrain.data.dataset.RESERVED_KEYS, e.g. "labels") is refused here too, before any model
    loads, not only when the dataset is built.
    """
    from vltrain.data.dataset import check_reserved  # dataset.py imports this module

    return [check_reserved(parse_record(r, i, str(path), require_reply=require_reply))
            for i, r in enumerate(read_records(path))]
