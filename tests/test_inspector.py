"""vltrain.inspector: planted bad samples are named by id with their reason, the rest counted usable; the rendered
label mask equals the data layer's labels token for token; DPO / GRPO / classification data; the CLI's errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO, write_image
from vltrain.config import SFTConfig, load_config
from vltrain.data.encode import IGNORE_INDEX, encode
from vltrain.data.formats import parse_record
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.inspector import estimate, inspect_data, main, render_html, run
from vltrain.tiny import build_tiny_processor

MODEL = "qwen2_5_vl"
MAX_SEQ = 64
LONG = "the quick brown fox jumps over the lazy dog " * 6


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(MODEL)


def turns(*texts):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


def planted_records() -> list[dict]:
    """Four good samples and one of each kind of bad one, with the reason the data layer gives."""
    good = [{"id": f"good{k}", "image": "a.png", "conversations": turns("<image>\nWhat colour?", "red")} for k in range(3)]
    good.append({"id": "text_only", "conversations": turns("Say hello.", "hello there")})
    return good + [
        {"id": "missing_img", "image": "nowhere.png", "conversations": turns("<image>\nWhat colour?", "red")},
        {"id": "corrupt_img", "image": "corrupt.png", "conversations": turns("<image>\nWhat colour?", "red")},
        {"id": "too_long", "image": "a.png", "conversations": turns("<image>\nDescribe the image.", LONG)},
        # the first turn fits, the second is cut: truncated, still usable
        {"id": "cut_second_turn", "image": "a.png",
         "conversations": turns("<image>\nWhat colour?", "red", "Describe the image.", LONG)},
        {"id": "placeholders", "image": ["a.png", "a.png"], "conversations": turns("<image>\nWhat colour?", "red")},
        {"id": "empty_reply", "conversations": turns("Say hello.", "")},
        # a field named like an Example key: load_conversations refuses it as the file is read
        {"id": "reserved_field", "labels": [1, 2], "conversations": turns("Say hello.", "hello")},
    ]


EXPECTED_REJECTED = {  # id -> (stage, a part of the reason)
    "missing_img": ("skipped", "image file not found"),
    "corrupt_img": ("skipped", "cannot decode image"),
    "too_long": ("skipped", f"max_seq_length={MAX_SEQ}"),
    "placeholders": ("parse", "placeholders"),
    "empty_reply": ("parse", "empty assistant turn"),
    "reserved_field": ("parse", "field 'labels' would overwrite"),
}


def write_planted(folder: Path) -> Path:
    write_image(folder / "a.png", (56, 56), seed=3)
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    path = folder / "train.json"
    path.write_text(json.dumps(planted_records()))
    return path


def sft_config(folder: Path, train_path: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [f"model.name_or_path=tiny:{MODEL}", f"data.train_path={train_path}",
                                         f"data.image_folder={folder}", f"data.max_seq_length={MAX_SEQ}",
                                         "data.max_bad_fraction=0.5", f"train.output_dir={folder / 'out'}", *extra])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("planted")
    cfg = sft_config(folder, write_planted(folder))
    report = inspect_data(cfg, "sft", processor=processor, image_factor=family_spec(MODEL).image_factor,
                          num_examples=8, show_progress=False)
    return folder, cfg, report


class Spans(HTMLParser):
    """Every token element (`data-id`) of every `.seq` block, by (sample id, sequence name): (id, trained) per
    token, a media chip expanded to its `data-count` tokens."""

    def __init__(self):
        super().__init__()
        self.sequences: dict[tuple[str, str], list[tuple[int, bool]]] = {}
        self.current = None
        self.depth = 0
        self.answers: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.current is not None:
            self.depth += 1
        if "data-seq" in attrs:
            self.current, self.depth = (attrs["data-sample"], attrs["data-seq"]), 0
            self.sequences[self.current] = []
        elif self.current is not None and "data-id" in attrs:
            token = (int(attrs["data-id"]), attrs["data-trained"] == "1")
            self.sequences[self.current] += [token] * int(attrs.get("data-count", 1))

    def handle_endtag(self, tag):
        if self.current is None:
            return
        if self.depth == 0:
            self.current = None
        else:
            self.depth -= 1


def parse_spans(page: str) -> dict:
    parser = Spans()
    parser.feed(page)
    return parser.sequences


# ------------------------------------------------------------------------------------------ SFT
def test_planted_samples_are_named_with_their_reasons(planted):
    _, _, report = planted
    train = report["splits"]["train"]
    rejected = {r["id"]: r for r in train["rejected"]}
    assert set(rejected) == set(EXPECTED_REJECTED)
    for sample_id, (stage, reason) in EXPECTED_REJECTED.items():
        assert rejected[sample_id]["stage"] == stage, rejected[sample_id]
        assert reason in rejected[sample_id]["reason"], rejected[sample_id]
    assert train["num_read"] == len(planted_records())
    assert train["num_usable"] == 5  # the four good ones and the truncated one
    assert train["num_rejected"] == len(EXPECTED_REJECTED)
    assert train["missing_media"] == ["missing_img"]
    over = {o["id"]: o["action"] for o in train["over_length"]}
    assert over["too_long"] == "skipped" and over["cut_second_turn"].startswith("truncated to ")
    cut = next(s for s in train["samples"] if s["id"] == "cut_second_turn")
    assert cut["tokens"] > MAX_SEQ and cut["media"] == 4 and cut["text"] == cut["tokens"] - 4
    # records that do not parse make the recipe's loader refuse the whole file: training would stop
    assert not report["usable"]
    assert "placeholders" in report["problem"] and "train.json" in report["problem"]


def test_rendered_label_mask_equals_the_data_layer_labels(planted, processor):
    folder, cfg, report = planted
    page = render_html(report)
    sequences = parse_spans(page)
    media = MediaOptions.from_config(cfg.data, image_factor=family_spec(MODEL).image_factor)
    records = {r["id"]: (i, r) for i, r in enumerate(planted_records())}
    for sample_id in ("good0", "text_only", "cut_second_turn"):
        index, record = records[sample_id]
        conv = parse_record(record, index, cfg.data.train_path)
        example = encode(conv, processor, media, max_seq_length=MAX_SEQ, image_folder=str(folder))
        rendered = sequences[(sample_id, "sequence")]
        assert [t for t, _ in rendered] == example["input_ids"].tolist()
        assert [trained for _, trained in rendered] == (example["labels"] != IGNORE_INDEX).tolist()
        assert any(trained for _, trained in rendered) and not all(trained for _, trained in rendered)
    assert 'class="t media"' in page and "data:image/png;base64," in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_usable_file_exits_0_and_writes_the_report(tmp_path, capsys):
    write_image(tmp_path / "a.png", (56, 56))
    records = [r for r in planted_records() if r["id"] not in EXPECTED_REJECTED or EXPECTED_REJECTED[r["id"]][0] != "parse"]
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = tmp_path / "report.html"
    args = [f"model.name_or_path=tiny:{MODEL}", f"data.train_path={tmp_path / 'train.json'}",
            f"data.image_folder={tmp_path}", f"data.max_seq_length={MAX_SEQ}", "data.max_bad_fraction=0.5",
            f"train.output_dir={tmp_path / 'out'}", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2"]
    assert run(args + ["--out", str(out), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed.splitlines()[-1]
    assert "rejected: missing_img, corrupt_img, too_long" in printed
    # 8 records -> 8 loader slots / micro-batch 2 = 4 micro-batches / accumulation 2 = 2 steps per epoch
    assert "~2 optimizer steps per epoch" in printed
    assert len(parse_spans(out.read_text())) == 2
    # over max_bad_fraction: training would stop (TooManySkips), so the data is not usable
    with pytest.raises(SystemExit) as stop:
        main(args[:-2] + ["data.max_bad_fraction=0.1", "--out", str(out)])
    assert stop.value.code == 1
    assert "data.max_bad_fraction=0.1" in capsys.readouterr().err


def test_estimate_counts_steps_like_the_loader(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train_path=x.json", "train.micro_batch_size=2",
                                        "train.gradient_accumulation_steps=2", "train.max_steps=10"])
    est = estimate(cfg, "sft", [10] * 9, num_processes=2)
    # 9 samples / 2 = 5 micro-batches; 3 per rank (accelerate's even batches); / accumulation 2 = 2 steps
    assert (est["micro_batches_per_epoch"], est["steps_per_epoch"], est["samples_per_step"]) == (5, 2, 8)
    assert est["tokens_per_epoch"] == 90 and est["epochs"] == 5.0
    budget = load_config(SFTConfig, None, ["data.train_path=x.json", "data.max_seq_length=20",
                                           "data.max_tokens_per_batch=25"])
    est = estimate(budget, "sft", [10] * 9, num_processes=1)
    assert est["micro_batches_per_epoch"] == 5 and est["steps_per_epoch"] == 5  # two samples of 10 per budget
    # a preference pair's micro-batch holds chosen + rejected, which may not fit a budget >= max_seq_length
    too_small = load_config(SFTConfig, None, ["data.train_path=x.json", "data.max_seq_length=16",
                                              "data.max_tokens_per_batch=16"])
    assert "max_tokens_per_batch" in estimate(too_small, "dpo", [20] * 3, num_processes=1)["error"]


# ------------------------------------------------------------------------------------------ other loops
def test_dpo_pairs_render_chosen_and_rejected(tmp_path, capsys):
    from vltrain.data.pairs import PairDataset, load_pairs
    from vltrain.synthetic import write_shape_pairs

    train_path, _ = write_shape_pairs(tmp_path / "data", num_train=6, num_eval=2)
    records = json.loads(train_path.read_text())
    records.append({**records[0], "id": "same", "rejected": records[0]["chosen"]})
    train_path.write_text(json.dumps(records))
    images = tmp_path / "data" / "images"
    config = tmp_path / "dpo.yaml"  # the loop comes from the config's dpo: section
    config.write_text(f"model: {{name_or_path: 'tiny:{MODEL}'}}\ndata: {{train_path: {train_path}, image_folder: "
                      f"{images}, max_seq_length: 256, max_bad_fraction: 0.5}}\ndpo: {{beta: 0.1}}\n"
                      f"train: {{output_dir: {tmp_path / 'out'}}}\n")
    assert run([str(config), "--examples", "2"]) == 0
    assert "1 rejected" in capsys.readouterr().out
    page = (tmp_path / "out" / "inspect.html").read_text()
    assert "chosen and rejected are the same text" in page
    sequences = parse_spans(page)
    processor = build_tiny_processor(MODEL)
    dataset = PairDataset(load_pairs(train_path), processor, MediaOptions(image_factor=28), max_seq_length=256,
                          image_folder=str(images))
    example = dataset.encode(0)
    for name in ("chosen", "rejected"):
        rendered = sequences[(records[0]["id"], name)]
        assert [t for t, _ in rendered] == example[name]["input_ids"].tolist()
        assert [trained for _, trained in rendered] == (example[name]["labels"] != IGNORE_INDEX).tolist()


def test_grpo_prompts_train_nothing_and_show_the_reference_answer(tmp_path, processor):
    from vltrain.config import GRPOConfig
    from vltrain.synthetic import write_shapes_dataset

    train_path, eval_path = write_shapes_dataset(tmp_path / "data", num_train=6, num_eval=2)
    cfg = load_config(GRPOConfig, None, [f"model.name_or_path=tiny:{MODEL}", f"data.train_path={train_path}",
                                         f"data.eval_path={eval_path}", f"data.image_folder={tmp_path / 'data/images'}",
                                         f"train.output_dir={tmp_path / 'out'}", "grpo.max_prompt_length=200",
                                         "grpo.num_generations=4", "grpo.max_completion_length=8"])
    report = inspect_data(cfg, "grpo", processor=processor, image_factor=28, num_examples=3, show_progress=False)
    assert report["usable"] and report["splits"]["train"]["num_usable"] == 6
    assert report["splits"]["eval"]["num_usable"] == 2
    est = report["estimate"]
    prompts = [s["batch_tokens"] for s in report["splits"]["train"]["samples"]]
    assert est["tokens_per_epoch"] == sum(prompts)
    assert est["rollout_tokens_per_epoch"] == sum(4 * (p + 8) for p in prompts)
    page = render_html(report)
    first = json.loads(train_path.read_text())[0]
    rendered = parse_spans(page)[(first["id"], "sequence")]
    assert rendered and not any(trained for _, trained in rendered)
    assert f"</code> column the rewards see): {first['conversations'][1]['value']}</div>" in page


def test_classification_labels_and_a_label_outside_the_classes(tmp_path, processor):
    from vltrain.config import CLSConfig
    from vltrain.synthetic import write_shape_classes

    train_path, _ = write_shape_classes(tmp_path / "data", num_train=6, num_eval=2)
    records = json.loads(train_path.read_text())
    records.append({**records[0], "id": "hexagon", "label": "hexagon"})
    train_path.write_text(json.dumps(records))
    cfg = load_config(CLSConfig, None, [f"model.name_or_path=tiny:{MODEL}", f"data.train_path={train_path}",
                                        f"data.image_folder={tmp_path / 'data/images'}", "cls.classes=[circle,square,triangle]",
                                        f"train.output_dir={tmp_path / 'out'}"])
    report = inspect_data(cfg, "cls", processor=processor, image_factor=28, num_examples=2, show_progress=False)
    train = report["splits"]["train"]
    assert [(r["id"], r["stage"]) for r in train["rejected"]] == [("hexagon", "parse")]
    assert "not one of the classes" in train["rejected"][0]["reason"]
    assert train["num_usable"] == 6 and not report["usable"]
    page = render_html(report)
    first = report["examples"][0]
    assert first["label"] == f"{records[0]['label']} (class {['circle', 'square', 'triangle'].index(records[0]['label'])})"
    assert f"<b>label</b>: {first['label']}" in page
    assert not any(trained for _, trained in parse_spans(page)[(first["id"], "sequence")])


# ------------------------------------------------------------------------------------------ CLI
def test_missing_data_file_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nope.json"
    result = subprocess.run([sys.executable, "-m", "vltrain.inspector", f"data.train_path={missing}",
                             f"train.output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: data file {str(missing)!r} does not exist"
    assert "Traceback" not in result.stdout + result.stderr
    with pytest.raises(SystemExit) as stop:
        main([f"data.train_path={tmp_path}/x.json", "--loop", "dpo", "--num_processes", "0"])
    assert stop.value.code.startswith("error: ") and "\n" not in stop.value.code


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--loop", "--out", "--examples", "--num_processes"):
        assert option in text


def test_screenshot_of_a_report(planted):
    chromium = Path("/usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not chromium.exists() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed")
    _, _, report = planted
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page_path = artifacts / "inspect.html"
    page_path.write_text(render_html(report, config="tests/test_inspector.py"))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_path.as_uri(), wait_until="domcontentloaded")
        page.wait_for_selector(".summary")
        assert page.locator("table.rejected tr").count() == len(EXPECTED_REJECTED) + 1  # + the header row
        page.screenshot(path=str(artifacts / "inspect.png"), full_page=True)
        browser.close()
    assert (artifacts / "inspect.png").stat().st_size > 10_000


def test_a_mixture_report_counts_every_train_file(tmp_path, processor):
    """With data.train_path a list of files, the page's headline counts (media missing, over-length, token
    percentiles) cover every file, not the first one only."""
    write_image(tmp_path / "a.png", (56, 56))
    good = [r for r in planted_records() if r["id"] not in EXPECTED_REJECTED]
    (tmp_path / "first.json").write_text(json.dumps(good))
    (tmp_path / "second.json").write_text(json.dumps([r for r in planted_records() if r["id"] == "missing_img"] + good))
    cfg = sft_config(tmp_path, tmp_path / "first.json")
    cfg.data.train_path = [str(tmp_path / "first.json"), str(tmp_path / "second.json")]
    report = inspect_data(cfg, "sft", processor=processor, image_factor=family_spec(MODEL).image_factor,
                          num_examples=1, show_progress=False)
    splits = report["splits"]
    assert splits["train"]["missing_media"] == [] and splits["train[1]"]["missing_media"] == ["missing_img"]
    page = render_html(report)
    assert '<div class="v">1</div><div class="k">train samples with media missing</div>' in page
    longest = max(s["tokens"] for name in ("train", "train[1]") for s in splits[name]["samples"])
    assert f'/ {longest:,}</div><div class="k">train tokens p50 / max</div>' in page
