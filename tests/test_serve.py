"""The chat page (vltrain.serve) and token streaming (vltrain.generation.stream).

Streaming is checked against batch generation on a tiny model; gradio history -> Conversation as a pure function;
and the whole page in headless Chromium: a served tiny export, an uploaded image, two turns, replies read back from
the page equal to `generate` on the same conversations (media limits and system prompt from the export's config).
"""

from __future__ import annotations

import functools
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vltrain.data.formats import Conversation, Part, Turn
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.generation import GenerationSettings, generate, stream
from vltrain.serve import host_warning, main, media_kind, to_conversation
from vltrain.tiny import build_tiny

from conftest import REPO, write_image

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_TYPE = "qwen2_5_vl"
CHROMIUM = Path("/usr/bin/chromium")


@functools.lru_cache(maxsize=None)
def _tiny():
    model, processor = build_tiny(MODEL_TYPE)
    return model.eval(), processor


def _media() -> MediaOptions:
    return MediaOptions(image_factor=family_spec(MODEL_TYPE).image_factor, image_max_pixels=56 * 56)


def _prompt(tmp_path, with_image: bool) -> Conversation:
    parts = [Part("text", "What colour is the shape?")]
    if with_image:
        parts.insert(0, Part("image", str(write_image(tmp_path / "a.png", (96, 80), seed=3))))
    return Conversation("p", [Turn("user", parts)])


# ------------------------------------------------------------------------------------------ stream
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_stream_final_text_equals_generate_greedy(tmp_path, with_image):
    model, processor = _tiny()
    conv, settings = _prompt(tmp_path, with_image), GenerationSettings(max_new_tokens=10)
    kwargs = dict(media=_media(), system_prompt="Answer in one word.")
    expected = generate(model, processor, [conv], settings, show_progress=False, **kwargs)[0]
    texts = list(stream(model, processor, conv, settings, **kwargs))
    assert expected.finish_reason == "length" and expected.text.strip()  # 10 tokens of a random model: no eos
    assert texts[-1] == expected.text
    assert len(texts) >= 3, texts  # it streamed: pieces before the end
    assert all(b.startswith(a) and a != b for a, b in zip(texts, texts[1:])), texts  # text so far, growing


def test_stream_cuts_at_a_stop_string_as_generate_does(tmp_path):
    model, processor = _tiny()
    conv = _prompt(tmp_path, with_image=True)
    free = generate(model, processor, [conv], GenerationSettings(max_new_tokens=10), media=_media(),
                    show_progress=False)[0].text
    stop = free.split()[1]  # a word from the middle of the free-running reply
    settings = GenerationSettings(max_new_tokens=10, stop_strings=[stop])
    expected = generate(model, processor, [conv], settings, media=_media(), show_progress=False)[0]
    texts = list(stream(model, processor, conv, settings, media=_media()))
    assert expected.finish_reason == "stop" and expected.text.endswith(stop) and len(expected.text) < len(free)
    assert texts[-1] == expected.text
    assert all(stop not in t[:-len(stop)] for t in texts)  # never shown past the stop string


def test_closing_the_stream_stops_generation():
    model, processor = _tiny()
    conv = Conversation("p", [Turn("user", [Part("text", "Say hello.")])])
    settings = GenerationSettings(max_new_tokens=150)
    free = generate(model, processor, [conv], settings, media=_media(), show_progress=False)[0]
    assert free.finish_reason == "length"  # left alone, it runs all 150 tokens (150 forwards)
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        texts = stream(model, processor, conv, settings, media=_media())
        first = next(texts)
        texts.close()  # joins the generation thread
        assert first
        assert not any(t.name == "vltrain-stream" and t.is_alive() for t in threading.enumerate())
        assert len(forwards) < 50
    finally:
        hook.remove()


def test_stream_raises_errors_of_the_generation_thread():
    model, processor = _tiny()
    conv = Conversation("p", [Turn("user", [Part("text", "hi")])])
    def fail(*_):
        raise RuntimeError("boom in forward")

    hook = model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom in forward"):
            list(stream(model, processor, conv, GenerationSettings(max_new_tokens=4), media=_media()))
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="must not end with an assistant turn"):
        next(stream(model, processor, Conversation("x", [Turn("user", [Part("text", "a")]),
                                                          Turn("assistant", [Part("text", "b")])]),
                    GenerationSettings(), media=_media()))


# ------------------------------------------------------------------------------------------ history
def test_history_with_files_and_two_turns_to_conversation():
    image = {"type": "file", "file": {"path": "/tmp/g/cat.png", "mime_type": "image/png"}, "alt_text": None}
    history = [  # gradio 6: the first user turn (an image, then text) comes back as two user messages
        {"role": "user", "content": [image], "metadata": None, "options": None},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    message = {"text": "And these?", "files": ["/tmp/g/dog.jpg", "/tmp/g/clip.mp4"]}
    conv, system = to_conversation(history, message, "  ")
    assert system is None
    assert [t.role for t in conv.turns] == ["user", "assistant", "user"]
    assert [(p.kind, p.value) for p in conv.turns[0].parts] == [("image", "/tmp/g/cat.png"), ("text", "What is this?")]
    assert [(p.kind, p.value) for p in conv.turns[1].parts] == [("text", "A cat.")]
    assert [(p.kind, p.value) for p in conv.turns[2].parts] == [
        ("image", "/tmp/g/dog.jpg"), ("video", "/tmp/g/clip.mp4"), ("text", "And these?")]


def test_history_forms_gradio_hands_a_chat_function():
    # What ChatInterface appends itself (before preprocessing): {"path"} files and plain strings.
    history = [{"role": "user", "content": {"path": "/x/clip.webm"}}, {"role": "user", "content": "Describe it."},
               {"role": "assistant", "content": "A road."}]
    conv, system = to_conversation(history, "Again?", "You are a shape expert.\n")
    assert system == "You are a shape expert."
    assert [(p.kind, p.value) for t in conv.turns for p in t.parts] == [
        ("video", "/x/clip.webm"), ("text", "Describe it."), ("text", "A road."), ("text", "Again?")]
    first, _ = to_conversation([], {"text": "hi", "files": []}, None)
    assert first.turns == [Turn("user", [Part("text", "hi")])]


def test_history_errors_name_the_problem():
    with pytest.raises(ValueError, match="type a message"):
        to_conversation([], {"text": "  ", "files": []}, "")
    with pytest.raises(ValueError, match="'notes.pdf' is neither an image nor a video"):
        to_conversation([], {"text": "read", "files": ["/u/notes.pdf"]}, "")
    with pytest.raises(ValueError, match="assistant message holds a file"):
        to_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": {"path": "/a.png"}}],
                        "more", "")
    assert media_kind("/a/B.JPEG") == "image" and media_kind("/a/noext", "video/mp4") == "video"


def test_host_warning_only_off_this_machine():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    warning = host_warning("0.0.0.0")
    assert warning.startswith("warning: serving on 0.0.0.0") and "anyone who can reach this machine" in warning


def test_serving_off_this_machine_warns_before_anything_else(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such folder"):
        main(["--model", str(tmp_path / "nowhere"), "--host", "0.0.0.0"])
    assert capsys.readouterr().out.splitlines()[0] == host_warning("0.0.0.0")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nowhere")])
    assert "warning" not in capsys.readouterr().out


def test_main_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: --model .*nowhere.*: no such folder$"):
        main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"^error: --temperature must be a number >= 0"):
        main(["--model", str(tmp_path), "--temperature", "-1"])
    with pytest.raises(SystemExit):  # argparse: --bits 5 is not a choice
        main(["--model", str(tmp_path), "--bits", "5"])
    assert "--bits" in capsys.readouterr().err


def test_build_app_prefills_system_prompt_and_controls(tmp_path):
    import gradio as gr

    from vltrain.inference import TrainedModel
    from vltrain.serve import build_app

    model, processor = _tiny()
    trained = TrainedModel(model, processor, _media(), "You are a shape expert.", None, tmp_path / "final",
                           {"data": {"image_max_pixels": 3136}})
    app = build_app(trained, GenerationSettings(max_new_tokens=33, temperature=0.7, top_k=5))
    assert isinstance(app, gr.Blocks)
    assert app.title == f"vltrain · {tmp_path / 'final'}"
    assert "images <= 3136 pixels" in app.description and MODEL_TYPE in app.description
    values = {c.label: c.value for c in app.additional_inputs}
    assert values == {"System prompt": "You are a shape expert.", "Temperature": 0.7, "Top-p": 1.0, "Top-k": 5,
                      "Repetition penalty": 1.0, "Max new tokens": 33}
    assert set(app.textbox.file_types) == {"image", "video"}
    trained.system_prompt = None
    assert build_app(trained, GenerationSettings()).additional_inputs[0].value == ""


def test_chat_function_streams_generate_reply_and_shows_user_errors(tmp_path):
    import gradio as gr

    from vltrain.inference import TrainedModel
    from vltrain.serve import build_app

    model, processor = _tiny()
    trained = TrainedModel(model, processor, _media(), None, None, tmp_path, {})
    reply = build_app(trained, GenerationSettings()).fn
    image = write_image(tmp_path / "a.png", (96, 80), seed=3)
    message = {"text": "What colour?", "files": [str(image)]}
    # Sliders hand over floats; system box "", temperature 0, top_p 1, top_k 0, repetition 1, 6 new tokens.
    texts = list(reply(message, [], "Be brief.", 0.0, 1.0, 0.0, 1.0, 6.0))
    prompt = Conversation("chat", [Turn("user", [Part("image", str(image)), Part("text", "What colour?")])])
    expected = generate(model, processor, [prompt], GenerationSettings(max_new_tokens=6), media=_media(),
                        system_prompt="Be brief.", show_progress=False)[0].text
    assert len(texts) > 1 and texts[-1] == expected
    with pytest.raises(gr.Error, match="neither an image nor a video"):
        next(reply({"text": "read", "files": ["/u/notes.pdf"]}, [], "", 0.0, 1.0, 0.0, 1.0, 6.0))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="broken.png"):
        list(reply({"text": "look", "files": [str(tmp_path / "broken.png")]}, [], "", 0.0, 1.0, 0.0, 1.0, 6.0))


# ------------------------------------------------------------------------------------------ browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(folder: Path) -> None:
    """A tiny export as recipes write one: weights, processor, and the run's vltrain_config.yaml."""
    from vltrain.config import SFTConfig, dump_config, load_config

    model, processor = _tiny()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = load_config(SFTConfig, None, [f"model.name_or_path=tiny:{MODEL_TYPE}", "model.dtype=float32",
                                        "data.train_path=train.json", f"data.image_max_pixels={56 * 56}",
                                        "data.system_prompt=You are a shape expert."])
    dump_config(cfg, folder / "vltrain_config.yaml")


def _start_server(folder: Path, port: int) -> tuple[subprocess.Popen, queue.Queue]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vltrain.serve", "--model", str(folder), "--port", str(port),
                               "--max_new_tokens", "8"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout] + [lines.put(None)],
                     daemon=True).start()
    return server, lines


def _wait_for_url(server, lines: queue.Queue, timeout: float = 150) -> tuple[str, list[str]]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            pytest.fail(f"the server exited ({server.wait()}):\n{''.join(seen)}")
        seen.append(line)
        url = re.search(r"http://\S+", line)
        if line.startswith("vltrain serve:") and url:
            return url.group(0), seen
    pytest.fail(f"no URL from the server after {timeout} s:\n{''.join(seen)}")


def _last_bot_reply(page, count: int, timeout: float = 60) -> str:
    """The text of bot message number `count` once it is there, the textbox is usable again and the text has not
    changed for a second."""
    bot = page.locator('[data-testid="bot"] .message-content')
    deadline, text, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        if bot.count() >= count and page.locator('textarea[data-testid="textbox"]').is_enabled():
            now = bot.nth(count - 1).inner_text()
            if now != text:
                text, since = now, time.monotonic()
            elif text.strip() and time.monotonic() - since > 1.0:
                return text
        time.sleep(0.2)
    pytest.fail(f"bot message {count} did not settle in {timeout} s (last text {text!r})")


def _send(page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.set_input_files('input[data-testid="file-upload"]', str(image))
        page.wait_for_selector(f'img[src*="{image.name}"]', timeout=20_000)  # the upload's thumbnail
    page.fill('textarea[data-testid="textbox"]', text)
    page.keyboard.press("Enter")


def test_chat_page_in_a_browser_replies_as_generate_does(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from vltrain.inference import load_trained

    folder = tmp_path / "final"
    _export(folder)
    image = write_image(tmp_path / "shape.png", (96, 80), seed=5)
    port = _free_port()
    server, lines = _start_server(folder, port)
    try:
        # While the server starts: the replies generate() gives for the same conversations.
        trained = load_trained(folder, device="cpu")
        assert trained.media.image_max_pixels == 56 * 56 and trained.system_prompt == "You are a shape expert."
        settings = GenerationSettings(max_new_tokens=8)  # the page's defaults: greedy
        first = Conversation("c", [Turn("user", [Part("image", str(image)), Part("text", "What colour is it?")])])
        expected_1 = generate(trained.model, trained.processor, [first], settings, show_progress=False,
                              **trained.generate_kwargs())[0].text
        url, _ = _wait_for_url(server, lines)
        assert url.startswith(f"http://127.0.0.1:{port}")

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector('textarea[data-testid="textbox"]', timeout=30_000)
                assert "images <= 3136 pixels" in page.inner_text("body")  # the run's limits, on the page
                _send(page, "What colour is it?", image)
                reply_1 = _last_bot_reply(page, 1)
                assert " ".join(reply_1.split()) == " ".join(expected_1.split()), (reply_1, expected_1)

                second = Conversation("c", first.turns + [Turn("assistant", [Part("text", reply_1)]),
                                                          Turn("user", [Part("text", "And the shape?")])])
                expected_2 = generate(trained.model, trained.processor, [second], settings, show_progress=False,
                                      **trained.generate_kwargs())[0].text
                _send(page, "And the shape?")
                reply_2 = _last_bot_reply(page, 2)
                assert page.locator('[data-testid="bot"]').count() == 2
                assert " ".join(reply_2.split()) == " ".join(expected_2.split()), (reply_2, expected_2)
                page.get_by_text("System prompt and sampling").click()  # open the controls for the screenshot
                page.wait_for_selector("text=Max new tokens", timeout=10_000)
                assert page.locator("#system-prompt textarea").input_value() == "You are a shape expert."
                artifacts = REPO / "test-artifacts"
                artifacts.mkdir(exist_ok=True)
                page.screenshot(path=str(artifacts / "serve_chat.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.kill()
        server.wait(timeout=30)


def test_without_gradio_serve_says_what_to_install(monkeypatch, capsys):
    import sys

    from vltrain.serve import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: `import gradio` raises ImportError
    with pytest.raises(SystemExit) as info:
        main(["--model", "does/not/matter"])
    assert str(info.value.code) == ("error: vltrain serve needs gradio: pip install 'vltrain[ui]' "
                                    "(or pip install 'gradio>=6,<7')")
