"""Chat with a trained model in the browser: image / video upload, multi-turn history, streamed replies.

    python -m vltrain.serve --model outputs/demo/final            # then open http://127.0.0.1:7860

`--model` is anything `vltrain.inference.load_trained` loads: a full export, a run folder (its final/), a LoRA
export on its base (`--base`), `merged/`; `--bits 4|8` loads the LLM in 4 / 8-bit. Images and videos are sized and
frame-sampled with the training run's `data.*` settings, and the system prompt box starts with the run's system
prompt (empty: the chat template's default). The sampling controls start at the `--temperature`, `--top_p`, ...
given here (temperature 0 = greedy) and go through `vltrain.generation.stream`, the policy of batch generation.

The page binds 127.0.0.1 (this machine only). Another `--host` serves everyone who can reach the port, with no
login: a warning says so. One reply is generated at a time; the others wait in gradio's queue.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
from pathlib import Path

from vltrain.cli import program
from vltrain.data.formats import Conversation, Part, Turn
from vltrain.generation import GenerationSettings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v", ".mpeg", ".mpg"}


# ------------------------------------------------------------------------------------------ history
def media_kind(path: str, mime_type: str | None = None) -> str:
    """"image" or "video" for an uploaded file, from its mime type or else its suffix."""
    mime_type = mime_type or mimetypes.guess_type(path)[0] or ""
    suffix = Path(path).suffix.lower()
    if mime_type.startswith("image/") or suffix in IMAGE_SUFFIXES:
        return "image"
    if mime_type.startswith("video/") or suffix in VIDEO_SUFFIXES:
        return "video"
    raise ValueError(f"file {Path(path).name!r} is neither an image nor a video")


def _content_parts(content) -> list[Part]:
    """One gradio message's content -> Parts, in order. Content is a string, a file ({"path"} or gradio 6's
    {"type": "file", "file": {"path", "mime_type"}}), a text item ({"type": "text", "text"}), a tuple of paths
    (gradio's old tuple format) or a list of these."""
    if isinstance(content, str):
        return [Part("text", content)] if content.strip() else []
    if isinstance(content, tuple) and content and all(isinstance(c, str) for c in content):  # (path, alt_text?)
        return [Part(media_kind(content[0]), content[0])]
    if isinstance(content, (list, tuple)):
        return [part for item in content for part in _content_parts(item)]
    if isinstance(content, dict):
        if content.get("type") == "text":
            return _content_parts(content.get("text") or "")
        file = content.get("file") if content.get("type") == "file" else content
        if isinstance(file, dict) and file.get("path"):
            return [Part(media_kind(file["path"], file.get("mime_type")), file["path"])]
    raise ValueError(f"chat history: cannot read message content {content!r}")


def to_conversation(history: list[dict], message: dict | str,
                    system_text: str | None) -> tuple[Conversation, str | None]:
    """(the prompt Conversation, system_prompt) for gradio's `history` (role / content messages) plus the new
    `message` ({"text", "files"} of a MultimodalTextbox, or a string). Consecutive messages of one role are one turn
    (gradio returns a user turn with a file as two user messages); files come before the text, as gradio shows them;
    assistant turns are text. A blank system box gives None: the chat template's default system prompt."""
    turns: list[Turn] = []

    def add(role: str, parts: list[Part]):
        if role not in ("user", "assistant"):
            raise ValueError(f"chat history: unknown role {role!r}")
        if role == "assistant" and any(p.kind != "text" for p in parts):
            raise ValueError("chat history: an assistant message holds a file; only text replies are supported")
        if not parts:
            return
        if turns and turns[-1].role == role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(role, parts))

    for msg in history:
        add(msg.get("role"), _content_parts(msg.get("content")))
    if isinstance(message, str):
        message = {"text": message, "files": []}
    new = [Part(media_kind(f), f) for f in (message.get("files") or [])] + _content_parts(message.get("text") or "")
    if not new:
        raise ValueError("type a message or attach an image / video")
    add("user", new)
    if turns[0].role != "user":
        raise ValueError("chat history: the conversation must start with a user message")
    system = system_text.strip() if system_text else ""
    return Conversation("chat", turns, source="chat"), system or None


# ------------------------------------------------------------------------------------------ page
def describe(trained) -> str:
    """One line: where the model came from and what it was trained with (family, media limits)."""
    media = trained.media
    bits = [f"**{_model_name(trained)}**", f"family `{trained.model.config.model_type}`"]
    for name in ("image", "video"):
        lo, hi = getattr(media, f"{name}_min_pixels"), getattr(media, f"{name}_max_pixels")
        width, height = getattr(media, f"{name}_resized_width"), getattr(media, f"{name}_resized_height")
        what = "images" if name == "image" else "video frames"
        if width and height:
            bits.append(f"{what} resized to {width}x{height}")
        elif lo or hi:
            bits.append(f"{what} {lo}-{hi} pixels" if lo and hi else f"{what} <= {hi} pixels" if hi else
                        f"{what} >= {lo} pixels")
    bits.append(f"{media.nframes} frames per video" if media.nframes else f"{media.fps or 2} video frames per second")
    bits.append("media settings of the training run" if trained.config else
                "no vltrain_config.yaml: the processor's media defaults")
    return " · ".join(bits)


def _model_name(trained) -> str:
    weights = Path(trained.weights)
    return str(weights.parent if weights.name in ("adapter", "merged") else weights)


def build_app(trained, defaults: GenerationSettings):
    """The chat page (a gr.ChatInterface, itself a gr.Blocks) for a `vltrain.inference.TrainedModel`; sampling
    controls start at `defaults`. Not launched."""
    import gradio as gr

    from vltrain.data.encode import SampleSkipped
    from vltrain.generation import stream

    if not isinstance(defaults, GenerationSettings):
        raise ValueError(f"build_app: defaults must be a GenerationSettings, got {type(defaults).__name__}")

    def reply(message, history, system_text, temperature, top_p, top_k, repetition_penalty, max_new_tokens):
        try:
            conversation, system_prompt = to_conversation(history, message, system_text)
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                top_k=int(top_k), min_p=defaults.min_p, repetition_penalty=float(repetition_penalty),
                stop_strings=defaults.stop_strings, seed=defaults.seed)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        try:
            yield from stream(trained.model, trained.processor, conversation, settings, media=trained.media,
                              image_folder=trained.image_folder, system_prompt=system_prompt)
        except (ValueError, SampleSkipped) as e:  # an unreadable upload, a processor refusal: shown, not fatal
            raise gr.Error(str(e)) from e

    controls = [
        gr.Textbox(value=trained.system_prompt or "", label="System prompt", lines=2,
                   placeholder="empty: the chat template's default", elem_id="system-prompt"),
        gr.Slider(0, max(2.0, defaults.temperature), value=defaults.temperature, step=0.05, label="Temperature",
                  info="0 = greedy"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", info="1 = off"),
        gr.Slider(0, max(200, defaults.top_k), value=defaults.top_k, step=1, label="Top-k", info="0 = off"),
        gr.Slider(0.5, max(2.0, defaults.repetition_penalty), value=defaults.repetition_penalty, step=0.05,
                  label="Repetition penalty", info="1 = off"),
        gr.Slider(1, max(4096, defaults.max_new_tokens), value=defaults.max_new_tokens, step=1,
                  label="Max new tokens"),
    ]
    return gr.ChatInterface(
        reply, multimodal=True,
        textbox=gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple", sources=["upload"],
                                     placeholder="Ask about an image or a video (attach with the paperclip)"),
        chatbot=gr.Chatbot(label="vltrain", height=560, elem_id="chat"),
        additional_inputs=controls,
        additional_inputs_accordion=gr.Accordion("System prompt and sampling", open=False),
        title=f"vltrain · {_model_name(trained)}", description=describe(trained), analytics_enabled=False,
        fill_height=True,
    )


# ------------------------------------------------------------------------------------------ entry
def host_warning(host: str) -> str | None:
    """The line printed before serving on an address other machines can reach (None for this machine only)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine can use the model "
            "(there is no login; bind 127.0.0.1 and tunnel, e.g. ssh -L, to keep it private)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=program("python -m vltrain.serve"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export folder, a run folder (its final/), or a LoRA export")
    parser.add_argument("--base", default=None, help="base model of a LoRA export (default: the one it was trained on)")
    parser.add_argument("--bits", type=int, default=16, choices=(4, 8, 16),
                        help="load the LLM in 4 or 8 bit (bitsandbytes)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: the training dtype; CPU: float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    defaults = GenerationSettings()
    parser.add_argument("--max_new_tokens", type=int, default=512,
                        help="initial 'Max new tokens' of the page (default 512)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="initial temperature (0 = greedy)")
    parser.add_argument("--top_p", type=float, default=defaults.top_p, help="initial top-p (1 = off)")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="initial top-k (0 = off)")
    parser.add_argument("--min_p", type=float, default=defaults.min_p,
                        help="min-p for every reply (0 = off; no control)")
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty,
                        help="initial repetition penalty (1 = off)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a reply after this text (repeatable; no control)")
    parser.add_argument("--seed", type=int, default=None, help="seed every sampled reply (default: not seeded)")
    parser.add_argument("--system_prompt", default=None,
                        help="prefill the system prompt box with this instead of the run's")
    args = parser.parse_args(argv)
    try:
        serve(args)
    except ValueError as e:
        sys.exit(f"error: {' '.join(str(e).split())}")


def serve(args: argparse.Namespace) -> None:
    """Load, build, launch and block until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home (and no wait on a dead network)
    from vltrain.inference import load_trained

    try:
        import gradio  # noqa: F401 -- an optional dependency: say so before the model loads
    except ImportError:
        raise ValueError("vltrain serve needs gradio: pip install 'vltrain[ui]' (or pip install 'gradio>=6,<7')") from None

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                      repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                                      seed=args.seed)
    except ValueError as e:  # name the option, not the dataclass field
        raise ValueError(str(e).replace("GenerationSettings.stop_strings", "--stop")
                         .replace("GenerationSettings.", "--")) from None
    warning = host_warning(args.host)
    if warning:  # first, so it is on screen however long the loading takes
        print(warning, flush=True)
    print(f"loading {args.model} ...", flush=True)
    trained = load_trained(args.model, base=args.base, bits=args.bits, dtype=args.dtype, device=args.device)
    if args.system_prompt is not None:
        trained.system_prompt = args.system_prompt
    print(describe(trained).replace("**", "").replace("`", ""), flush=True)
    app = build_app(trained, settings)
    try:
        app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                      prevent_thread_lock=True, quiet=True, show_error=True)
    except OSError as e:  # gradio: "Cannot find empty port ..."
        raise ValueError(f"--port {args.port}: {e}") from e
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"vltrain serve: chat with {_model_name(trained)} at http://{host}:{args.port} (Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()


if __name__ == "__main__":
    main()
