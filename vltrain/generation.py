"""Batched generation from prompt conversations: left-padded batches through the model's own `generate`.

`generate(model, processor, conversations, settings, media=...)` encodes each prompt conversation (every
turn before the reply) with `vltrain.data.encode.process_conversation(..., add_generation_prompt=True)`,
left-pads input_ids / attention_mask / mm_token_type_ids into batches of `batch_size` (media tensors
concatenated in prompt order), runs `model.generate` once per batch and returns one `Generation` per
conversation, in input order: the completion text, its token ids and why it finished.

Policies:
- Left padding: the Qwen-VL rope index (`get_rope_index`) drops masked tokens before computing mRoPE
  ids, and decoding continues from `rope_deltas`, so a padded prompt generates what it generates alone
  (tested: batched == one-by-one token ids, on text / image / multi-image / video prompts).
- `GenerationSettings` is the whole sampling policy: temperature 0 is greedy (`do_sample=False`);
  the model's media placeholder tokens (image / video pads, vision start / end) are never generated;
  otherwise temperature / top_p / top_k / min_p are applied as given (0 = off for top_k and min_p).
  Of a checkpoint's `generation_config.json` only what the settings do not name is kept (eos / pad ids).
- `seed`: sampling runs on a forked RNG seeded with it (CPU and the model's CUDA device), so the same
  seed, conversations and batch_size give the same completions and the caller's global RNG state is
  left exactly as it was. `seed=None` draws from (and advances) the global RNG.
- `stop_strings`: transformers' `StopStringCriteria` stops a sequence once its text contains one; the
  text is cut right after the first stop string (the stop string is kept, so a reward can parse
  `</answer>`); `token_ids` end with the token that completed it.
- `token_ids` are the generated tokens through the first eos token (included), padding removed;
  `text` is their decoding without special tokens. `finish_reason` is "stop" (eos or a stop string) or
  "length" (max_new_tokens reached).
- Packed models (`enable_packed_attention`): the call runs under `attention.stock_attention(model)` --
  the text attention the model had before packing, KV cache on -- and restores packed attention after.
- LoRA (peft) models generate through the wrapper's `generate` (adapters active).

Sharded parameters (DeepSpeed ZeRO-3, FSDP2): every rank generates ITS OWN prompts and every forward
gathers parameters collectively, so all ranks must run the same sequence of forwards. With
`synced_gpus=True` (default None = auto: True when torch.distributed runs with world size > 1 AND the
model's parameters are sharded -- `parameters_sharded(model)`; an unsharded model under DDP may then
generate on the main process alone without waiting for peers that never come):
transformers keeps a finished rank stepping until every rank is done; every rank runs the same number
of batches (a rank with fewer prompts generates and discards a dummy batch); and every batch holds an
image and a video (a batch that lacks one gets an extra row of one dummy image / video token, one merged
token of zero pixels, generated and discarded), so the vision tower runs on every rank in every prefill,
as in training (vltrain.vision). Sampling under a seed uses that seed on every rank. Tested on 2 CPU
ranks under DeepSpeed ZeRO-3 (without the dummy rows that run hangs); FSDP2 is not testable on CPU
(accelerate runs an fsdp2 launch as DDP there) and relies on the same synced forwards, with the root module's own
vision tower kept inside the prefill forward (`_vision_in_prefill`: transformers would run it before the first
forward, outside FSDP2's gathering); a one-GPU FSDP2 GRPO run is a GPU test (tests/test_grpo.py).

Batches are cut in input order (no sorting by length); the model's train/eval mode is restored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from vltrain.data.encode import MEDIA_KEYS, process_conversation
from vltrain.data.formats import Conversation
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec, get_module


@dataclass
class GenerationSettings:
    """How to sample; validated on construction (errors name the field)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        def bad(name: str, expected: str):
            raise ValueError(f"GenerationSettings.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1] (0 = off)")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, (list, tuple)) or not all(
                isinstance(s, str) and s for s in self.stop_strings):
            bad("stop_strings", "a list of non-empty strings")
        self.stop_strings = list(self.stop_strings)
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            bad("seed", "None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self, model, tokenizer):
        """A transformers GenerationConfig: these settings over the model's eos / pad ids."""
        from transformers import GenerationConfig

        base = getattr(model, "generation_config", None)
        eos = getattr(base, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        pad = getattr(base, "pad_token_id", None)
        pad = tokenizer.pad_token_id if pad is None else pad
        if self.greedy:  # neutral values: a checkpoint's sampling defaults must not leak in (nor warn)
            sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        else:
            sampling = dict(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                            top_k=self.top_k, min_p=float(self.min_p))
        # A reply never holds media placeholders: a sampled <|image_pad|> would have no pixels behind it (and
        # break the training forward of a GRPO completion), so the model's media tokens are never generated.
        config = getattr(model, "config", None)
        media_tokens = sorted({getattr(config, name) for name in ("image_token_id", "video_token_id",
                                                                   "vision_start_token_id", "vision_end_token_id")
                               if isinstance(getattr(config, name, None), int)})
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, repetition_penalty=float(self.repetition_penalty), num_beams=1,
            stop_strings=self.stop_strings or None, eos_token_id=eos, pad_token_id=pad, use_cache=True,
            suppress_tokens=media_tokens or None, **sampling,
        )


@dataclass
class Generation:
    """One completion: its text (special tokens skipped, cut after a stop string), the generated token
    ids through the eos / stop-completing token, and "stop" (eos or stop string) or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]


# ------------------------------------------------------------------------------------------ batching
def left_pad_batch(prompts: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Processor outputs (each a batch of one) -> one left-padded batch.

    input_ids / mm_token_type_ids (1, L_i) each -> (B, max L_i), pads at the left; attention_mask (B, L)
    0 on pads; pixel_values (N_i, D) / image_grid_thw (I_i, 3) and the video ones concatenated in prompt
    order (the order in which the model scatters media features into media tokens).
    """
    if not prompts:
        raise ValueError("left_pad_batch needs at least one prompt")
    length = max(p["input_ids"].shape[1] for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    types = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids[row, length - n:] = p["input_ids"][0]
        mask[row, length - n:] = 1 if p.get("attention_mask") is None else p["attention_mask"][0]
        types[row, length - n:] = p["mm_token_type_ids"][0]
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    for key in MEDIA_KEYS:
        parts = [p[key] for p in prompts if p.get(key) is not None]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def add_dummy_media_row(model, batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[dict, bool]:
    """(batch with one extra last row holding a dummy image and/or video token where the batch lacks
    that modality, whether a row was added). The row's media come last, as its tokens do, so the real
    rows' media order and outputs are unchanged; its completion is discarded by the caller."""
    from vltrain.vision import missing_media

    dummy = missing_media(model, batch)
    if dummy is None:
        return batch, False
    n = len(dummy.token_ids)
    rows, length = batch["input_ids"].shape
    width = max(length, n)
    out = {}
    for key, fill, tail in (("input_ids", pad_token_id, dummy.token_ids), ("attention_mask", 0, [1] * n),
                            ("mm_token_type_ids", 0, dummy.type_ids)):
        t = batch[key]
        grown = torch.full((rows + 1, width), fill, dtype=t.dtype)
        grown[:rows, width - length:] = t
        if key == "attention_mask":
            grown[:rows, : width - length] = 0
        grown[rows, width - n:] = torch.tensor(tail, dtype=t.dtype)
        out[key] = grown
    for key in (*MEDIA_KEYS, "image_source", "video_source"):  # the real rows' media (and their sharing) unchanged
        if batch.get(key) is not None:
            out[key] = batch[key]
    return out | dummy.tensors, True  # (no second_per_grid_ts for a dummy video: the rope index takes 1 s per grid)


class _RowDone:
    """StoppingCriteria: row `row` is done from its first generated token on."""

    def __init__(self, row: int):
        self.row = row

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.row] = True
        return done


# ------------------------------------------------------------------------------------------ finishing
def finish(new_tokens: list[int], tokenizer, eos_ids: set[int], stop_strings: list[str]) -> Generation:
    """One row of `generate`'s new tokens -> Generation (cut at eos or the first stop string)."""
    for i, token in enumerate(new_tokens):
        if token in eos_ids:
            ids = new_tokens[: i + 1]
            return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, "stop")
    if stop_strings:
        # The first prefix whose text holds a stop string is where StopStringCriteria stopped the row;
        # what follows is padding.
        for i in range(len(new_tokens)):
            raw = tokenizer.decode(new_tokens[: i + 1], skip_special_tokens=False)
            if any(s in raw for s in stop_strings):
                ids = new_tokens[: i + 1]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                cut = min((text.find(s) + len(s) for s in stop_strings if s in text), default=len(text))
                return Generation(text[:cut], ids, "stop")
    return Generation(tokenizer.decode(new_tokens, skip_special_tokens=True), list(new_tokens), "length")


def parameters_sharded(model) -> bool:
    """True when this model's parameters are sharded over ranks: DeepSpeed ZeRO-3 parameters carry a
    `ds_id`, FSDP2 parameters are DTensors (read from the model: no accelerator needed)."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


def resolve_synced_gpus(synced_gpus: bool | None, model) -> bool:
    """None -> True when torch.distributed runs with world size > 1 and the parameters are sharded. An
    unsharded model (single process, DDP, ZeRO-1/2) generates alone, e.g. on the main process only."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if synced_gpus is None:
        return initialised and torch.distributed.get_world_size() > 1 and parameters_sharded(model)
    if synced_gpus and not initialised:
        raise ValueError("generate(synced_gpus=True) needs torch.distributed initialised (one process per rank)")
    return bool(synced_gpus)


def _max_over_ranks(value: int, device: torch.device) -> int:
    backend = torch.distributed.get_backend()
    t = torch.tensor([value], device=device if backend == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


@contextlib.contextmanager
def _forked_rng(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


def repeat_rows(prompts: list[dict], num_generations: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch with every prompt's row `num_generations` times in a row, its media ONCE: pixels
    in prompt order, one grid per occurrence (per row), `image_source` / `video_source` mapping each
    occurrence to its prompt's media (vltrain.vision.shared_media runs the tower once per prompt)."""
    from vltrain.data.pairs import MEDIA_SOURCES

    batch = left_pad_batch([p for p in prompts for _ in range(num_generations)], pad_token_id)
    if num_generations == 1:
        return batch
    for pixel_key, grid_key, source_key in MEDIA_SOURCES:
        sources, offset = [], 0
        for p in prompts:
            num = len(p[grid_key]) if p.get(grid_key) is not None else 0
            sources += [torch.arange(offset, offset + num)] * num_generations
            offset += num
        if offset:
            batch[pixel_key] = torch.cat([p[pixel_key] for p in prompts if p.get(pixel_key) is not None])
            batch[source_key] = torch.cat(sources)
    return batch


def _as_batch_of_one(prompt: dict) -> dict:
    """An encode_prompt Example (1-D tokens) or a processor output (batch of one) -> a processor output."""
    return {k: (v[None] if k in ("input_ids", "mm_token_type_ids", "attention_mask") and torch.is_tensor(v) and v.dim() == 1
                else v) for k, v in prompt.items()}


def eos_token_ids(config) -> set[int]:
    """A GenerationConfig's end-of-sequence ids as a set (its `eos_token_id` is an id, a list of ids or None)."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


# ------------------------------------------------------------------------------------------ entry
def generate(model, processor, conversations: list[Conversation], settings: GenerationSettings, *,
             media: MediaOptions, image_folder: str | None = None, system_prompt: str | None = None,
             batch_size: int = 8, show_progress: bool = True, synced_gpus: bool | None = None) -> list[Generation]:
    """Completions of `conversations` (each: the turns before the reply), in order; see the module docstring."""
    for conv in conversations:
        if not conv.turns or conv.turns[-1].role == "assistant":
            raise ValueError(f"generate: sample {conv.sample_id!r}: a prompt must not end with an assistant turn "
                             "(pass the turns before the reply)")
    chunks = [conversations[i: i + batch_size] for i in range(0, len(conversations), max(1, batch_size))]
    encode = lambda convs: [process_conversation(c, processor, media, image_folder=image_folder,  # noqa: E731
                                                 system_prompt=system_prompt, add_generation_prompt=True) for c in convs]
    return _generate_batches(model, processor, settings, [lambda c=c: encode(c) for c in chunks], batch_size=batch_size,
                             num_generations=1, show_progress=show_progress, synced_gpus=synced_gpus)


def generate_encoded(model, processor, prompts: list[dict], settings: GenerationSettings, *, num_generations: int = 1,
                     batch_size: int = 8, show_progress: bool = True, synced_gpus: bool | None = None) -> list[Generation]:
    """Completions of already encoded prompts (`vltrain.data.encode.encode_prompt` Examples), `num_generations`
    per prompt: [prompt 0's, prompt 1's, ...]. Each generate call holds `batch_size` prompts x `num_generations`
    rows and runs the vision tower once per prompt (`repeat_rows`); otherwise as `generate`."""
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"generate: num_generations must be an integer >= 1, got {num_generations!r}")
    chunks = [prompts[i: i + batch_size] for i in range(0, len(prompts), max(1, batch_size))]
    return _generate_batches(model, processor, settings, [lambda c=c: [_as_batch_of_one(p) for p in c] for c in chunks],
                             batch_size=batch_size, num_generations=num_generations, show_progress=show_progress,
                             synced_gpus=synced_gpus)


@contextlib.contextmanager
def _vision_in_prefill(model):
    """FSDP2: transformers' `generate` runs the vision tower before the first forward
    (`_prepare_multimodal_encoder_kwargs_for_generation`), outside the root module's forward, where FSDP2 neither has
    gathered the root's own parameters (patch embedding, merger) nor initialised its root state. For the call this
    instance reports no support for pre-computed media features, so the tower runs inside the prefill forward as in
    training. Any other model: unchanged."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model._supports_mm_encoder_outputs = lambda: False  # instance attribute: shadows the class method
    try:
        yield
    finally:
        del model._supports_mm_encoder_outputs


def _generate_batches(model, processor, settings: GenerationSettings, batches, *, batch_size: int, num_generations: int,
                      show_progress: bool, synced_gpus: bool | None) -> list[Generation]:
    """`batches`: one callable per generate call returning its prompts (processor outputs, batch of one)."""
    from transformers import StoppingCriteriaList

    from vltrain.attention import stock_attention
    from vltrain.vision import shared_media

    if not isinstance(settings, GenerationSettings):
        raise ValueError(f"generate: settings must be a GenerationSettings, got {type(settings).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate: batch_size must be an integer >= 1, got {batch_size!r}")
    synced = resolve_synced_gpus(synced_gpus, model)
    tokenizer = processor.tokenizer
    config = settings.generation_config(model, tokenizer)
    eos_ids = eos_token_ids(config)
    if config.pad_token_id is None and not eos_ids:
        raise ValueError("generate: neither the model's generation_config nor the tokenizer has a pad or eos token id")
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else min(eos_ids)
    vision = next(get_module(model, family_spec(model).vision_module).parameters())
    device = next(model.parameters()).device
    num_batches = _max_over_ranks(len(batches), device) if synced else len(batches)
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    try:
        with torch.no_grad(), stock_attention(model), _forked_rng(settings.seed, device):
            for b in tqdm(range(num_batches), desc="generate", disable=not show_progress):
                prompts = batches[b]() if b < len(batches) else []
                if prompts:
                    batch = repeat_rows(prompts, num_generations, pad_token_id)
                else:  # a rank out of prompts keeps its peers' forwards company
                    batch = {k: torch.zeros((0, 0), dtype=torch.long)
                             for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
                rows = len(prompts) * num_generations
                stopping = None
                if synced:
                    batch, added = add_dummy_media_row(model, batch, pad_token_id)
                    if added:  # the dummy row stops after one token instead of running to max_new_tokens
                        stopping = StoppingCriteriaList([_RowDone(rows)])
                batch = {k: v.to(device, dtype=vision.dtype if k.startswith("pixel_values") else None)
                         for k, v in batch.items()}
                inputs = {k: v for k, v in batch.items() if k not in ("image_source", "video_source")}
                with shared_media(model, batch), _vision_in_prefill(model):
                    out = model.generate(**inputs, generation_config=config, synced_gpus=synced,
                                         stopping_criteria=stopping, tokenizer=tokenizer if settings.stop_strings else None)
                new = out[:rows, batch["input_ids"].shape[1]:].tolist()
                results += [finish(row, tokenizer, eos_ids, settings.stop_strings) for row in new]
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------ streaming
class _Cancelled:
    """StoppingCriteria: every row is done once `event` is set (the reader stopped listening)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream(model, processor, conversation: Conversation, settings: GenerationSettings, *, media: MediaOptions,
           image_folder: str | None = None, system_prompt: str | None = None):
    """The completion of one prompt conversation as it grows: yields the text so far (not the new piece), for a chat
    UI. Same encoding and sampling policy as `generate` (one prompt: no padding), so the last text yielded is
    `generate(...)[0].text` (greedy: tested on a text and an image prompt): it is `finish`'s cut of the generated
    tokens, so the eos / stop-string rules are `generate`'s exactly, while the pieces before it are transformers'
    `TextIteratorStreamer` decoding (which holds back a half-decoded character or word) cut at a stop string.

    `model.generate` runs in a thread; closing the iterator early (a UI's stop button) stops that generation at its
    next token. An error in the thread is raised here once the stream ends."""
    import threading

    from transformers import StoppingCriteriaList, TextIteratorStreamer

    from vltrain.attention import stock_attention

    if not isinstance(settings, GenerationSettings):
        raise ValueError(f"stream: settings must be a GenerationSettings, got {type(settings).__name__}")
    if not conversation.turns or conversation.turns[-1].role == "assistant":
        raise ValueError(f"stream: sample {conversation.sample_id!r}: a prompt must not end with an assistant turn")
    tokenizer = processor.tokenizer
    config = settings.generation_config(model, tokenizer)
    eos_ids = eos_token_ids(config)
    prompt = process_conversation(conversation, processor, media, image_folder=image_folder,
                                  system_prompt=system_prompt, add_generation_prompt=True)
    vision = next(get_module(model, family_spec(model).vision_module).parameters())
    device = next(model.parameters()).device
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else min(eos_ids, default=0)
    inputs = {k: v.to(device, dtype=vision.dtype if k.startswith("pixel_values") else None)  # generate's batch of one
              for k, v in left_pad_batch([prompt], pad_token_id).items()}

    token_ids: list[int] = []

    class Streamer(TextIteratorStreamer):  # also keeps the generated ids, for `finish`
        def put(self, value):
            if not self.next_tokens_are_prompt:
                token_ids.extend(value.reshape(-1).tolist())
            super().put(value)

    streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    failure: list[BaseException] = []

    def run():
        was_training = model.training
        model.eval()
        try:  # grad mode and the forked RNG are per thread / per call: entered here, not by the caller
            with torch.no_grad(), stock_attention(model), _forked_rng(settings.seed, device):
                model.generate(**inputs, generation_config=config, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                               tokenizer=tokenizer if settings.stop_strings else None)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the reading thread
            failure.append(e)
            streamer.end()  # the reader must not wait forever for a stop signal
        finally:
            model.train(was_training)

    thread = threading.Thread(target=run, name="vltrain-stream", daemon=True)
    thread.start()
    text = shown = ""
    try:
        for piece in streamer:
            text += piece
            cut = min((text.find(s) + len(s) for s in settings.stop_strings if s in text), default=len(text))
            if text[:cut] != shown:
                shown = text[:cut]
                yield shown
        thread.join()
        if failure:
            raise failure[0]
        final = finish(token_ids, tokenizer, eos_ids, settings.stop_strings).text
        if final != shown:
            yield final
    finally:
        cancel.set()
        thread.join()
