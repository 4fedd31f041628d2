"""Safety audit (issue #16 item 4): weights as safetensors, no unrestricted unpickling, remote code only when
asked, the web UI on loopback, and recipes that write nowhere but output_dir and the cache folders.

Source checks read the code with `ast` (every call site, not a sample); the behaviour checks run the tiny
recipes: a resume with torch.load watched, the files of an export and a checkpoint, and a whole recipe under
strace with HOME, TMPDIR, HF_HOME and XDG_CACHE_HOME pointed at fresh folders and the working directory at
another, listing every file it creates.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, mixed_records, sft_config

SOURCES = sorted(p for folder in ("vltrain", "loops", "recipes") for p in (REPO / folder).rglob("*.py"))
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _calls(predicate):
    """(file:line, ast.Call) for every call in the package sources whose function matches `predicate(func)`."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and predicate(node.func):
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


# ------------------------------------------------------------------------------- unpickling
def test_every_torch_load_in_the_package_passes_weights_only_true():
    loads = _calls(lambda f: isinstance(f, ast.Attribute) and f.attr == "load"
                   and isinstance(f.value, ast.Name) and f.value.id == "torch")
    assert loads, "expected the legacy scheduler read at least"
    unsafe = [where for where, call in loads if not (isinstance(_keyword(call, "weights_only"), ast.Constant)
                                                     and _keyword(call, "weights_only").value is True)]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
    # nothing imports pickle / dill / joblib to read files either
    imports = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                        if n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle")]
    assert imports == []


@pytest.fixture
def sft_data(media_dir) -> Path:
    path = media_dir / "train.json"
    path.write_text(json.dumps(mixed_records()))
    return path


def test_a_resume_loads_nothing_with_weights_only_false_and_writes_safetensors(tmp_path, sft_data, monkeypatch,
                                                                               one_thread):
    """Train 2 steps with a checkpoint, resume to 3 with torch.load watched: every call it makes (accelerate's
    optimizer / RNG / sampler files included) is weights_only; the checkpoint's model weights and the export are
    safetensors, and the export holds no pickle-format weight file at all."""
    from recipes.sft import main

    out = tmp_path / "run"
    common = {"train.output_dir": str(out), "train.save_every": 2, "train.micro_batch_size": 2}
    main(sft_config(tmp_path, "qwen2_5_vl", sft_data, **common, **{"train.max_steps": 2}))
    [checkpoint] = sorted((out / "checkpoints").iterdir())
    names = sorted(p.name for p in checkpoint.rglob("*") if p.is_file())
    assert any(n.endswith(".safetensors") for n in names), names
    pickled = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    # accelerate's optimizer / RNG / sampler state is pickle-format (read back weights_only, below); no model weights
    state_files = r"(optimizer(_\d+)?\.bin|random_states_\d+\.pkl|sampler(_\d+)?\.bin)"
    assert all(re.fullmatch(state_files, n) for n in pickled), pickled

    real, calls = torch.load, []

    def watched(*args, **kwargs):
        calls.append(kwargs.get("weights_only", "default"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", watched)
    summary = main(sft_config(tmp_path, "qwen2_5_vl", sft_data, **common,
                              **{"train.max_steps": 3, "train.resume": "auto"}))
    assert summary["steps"] == 3 and calls, "the resume loaded nothing through torch.load"
    # torch >= 2.6 defaults to weights_only=True when it is not passed
    assert all(c is True or c == "default" for c in calls), calls
    assert torch.__version__ >= "2.6"

    export = out / "final"
    files = sorted(p.name for p in export.rglob("*") if p.is_file())
    assert "model.safetensors" in files or any(n.startswith("model-") and n.endswith(".safetensors") for n in files)
    assert [n for n in files if n.endswith(WEIGHT_SUFFIXES)] == [], files


def test_the_classifier_head_and_a_lora_export_are_safetensors(tmp_path, media_dir, one_thread):
    """The classification export (backbone + head) and a LoRA adapter export hold no pickle-format weights."""
    from recipes.cls import main

    from test_cls import cls_config, cls_records

    data = media_dir / "cls.json"
    data.write_text(json.dumps(cls_records()))
    for name, options in (("full", {}), ("lora", {"lora.enabled": "true", "trainable.freeze_llm": "true"})):
        main(cls_config(tmp_path / name, data, **{"train.max_steps": 1, **options}))
        names = sorted(p.name for p in (tmp_path / name / "out" / "final").rglob("*") if p.is_file())
        assert sum(n.endswith(".safetensors") for n in names) >= 2, names  # the backbone or adapter, and the head
        assert [n for n in names if n.endswith(WEIGHT_SUFFIXES)] == [], names


# ------------------------------------------------------------------------------- remote code
def _from_pretrained_calls():
    return _calls(lambda f: isinstance(f, ast.Attribute) and f.attr == "from_pretrained")


def _trust_value(call: ast.Call) -> str | None:
    value = _keyword(call, "trust_remote_code")
    return None if value is None else ast.unparse(value)


def test_trust_remote_code_is_never_true_and_only_comes_from_the_config():
    """Every from_pretrained passes trust_remote_code from the config (model_cfg / cfg.model / a variable set from
    it / the trained run's recorded config) or False -- never True, never another value."""
    calls = _from_pretrained_calls()
    assert len(calls) >= 4
    bad = []
    for where, call in calls:
        value = _trust_value(call)
        if value is None:
            continue  # omitted: checked by the next test
        if value != "False" and "trust_remote_code" not in value and value != "trust":
            bad.append((where, value))
    assert bad == []
    # `trust` (vltrain/inspector.py) and the recorded value (vltrain/inference.py) are read from the config
    for path in (REPO / "vltrain" / "inspector.py", REPO / "vltrain" / "inference.py"):
        text = path.read_text()
        assert "trust_remote_code=True" not in text
    assert "trust = cfg.model.trust_remote_code" in (REPO / "vltrain" / "inspector.py").read_text()
    from vltrain.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


def test_every_from_pretrained_passes_trust_remote_code_explicitly():
    """No from_pretrained leaves trust_remote_code to transformers' default: each passes the config's value."""
    omitted = [where for where, call in _from_pretrained_calls()
               if _trust_value(call) is None and ast.unparse(call.func) != "PeftConfig.from_pretrained"]  # no code
    assert omitted == []


# ------------------------------------------------------------------------------- the web UI
def test_serve_binds_loopback_by_default_and_warns_for_any_other_host(monkeypatch):
    import vltrain.serve as serve

    seen = {}

    class Parsed(Exception):
        pass

    real_parse = serve.argparse.ArgumentParser.parse_args

    def parse_and_stop(self, *args, **kwargs):
        seen["args"] = real_parse(self, *args, **kwargs)
        raise Parsed

    monkeypatch.setattr(serve.argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(Parsed):
        serve.main(["--model", "somewhere"])
    assert seen["args"].host == "127.0.0.1"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert serve.host_warning(host) is None
    assert "anyone who can reach" in serve.host_warning("0.0.0.0")


# ------------------------------------------------------------------------------- where a recipe writes
def _created_paths(log: Path, cwd: Path) -> set[Path]:
    """Paths the traced processes created or wrote (open with O_CREAT / O_WRONLY / O_RDWR, mkdir, rename targets,
    links), resolved against the working directory; failed calls are left out."""
    created = set()
    for line in log.read_text(errors="replace").splitlines():
        if "= -1" in line or "<unfinished" in line:
            continue
        head = line.split("(", 1)[0].split()[-1] if "(" in line else ""
        paths = re.findall(r'"([^"]*)"', line)
        if not paths:
            continue
        if head in ("openat", "open"):
            if not re.search(r"O_CREAT|O_WRONLY|O_RDWR|O_TRUNC", line):
                continue
            targets = paths[:1]
        elif head in ("creat", "mkdir", "mkdirat", "truncate"):
            targets = paths[:1]
        elif head in ("rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat"):
            targets = paths[-1:]
        else:
            continue
        for target in targets:
            path = Path(target)
            created.add(path if path.is_absolute() else cwd / path)
    return created


def _outside(created: set[Path], allowed: list[Path]) -> list[str]:
    allowed = [a.resolve() for a in allowed]
    bad = []
    for path in created:
        resolved = Path(os.path.normpath(path))
        if str(resolved).startswith(("/dev/", "/proc/", "/sys/")):
            continue
        if any(resolved == a or a in resolved.parents for a in allowed):
            continue
        bad.append(str(resolved))
    return sorted(bad)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("recipe", ["sft", pytest.param("dpo", marks=pytest.mark.skipif(
    not os.environ.get("VLTRAIN_FULL_TRIALS"), reason="~35 s under strace: set VLTRAIN_FULL_TRIALS=1"))])
def test_a_recipe_writes_only_into_output_dir_and_the_cache_folders(recipe, tmp_path, media_dir):
    """The whole recipe as a user runs it (`python recipes/<recipe>.py overrides`, every child process traced):
    each file or folder it creates lies in train.output_dir or in HOME / TMPDIR / HF_HOME / XDG_CACHE_HOME."""
    from test_dpo import pair_records

    records = mixed_records() if recipe == "sft" else pair_records()
    data = media_dir / f"{recipe}.json"
    data.write_text(json.dumps(records))
    roots = {name: tmp_path / name for name in ("home", "tmp", "hf_home", "xdg_cache", "cwd", "out")}
    for folder in roots.values():
        folder.mkdir()
    overrides = {
        "model.name_or_path": "tiny:qwen2_5_vl", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(data), "data.image_folder": str(media_dir), "data.num_workers": 0,
        "data.max_seq_length": 1024, "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2,
        "data.video_max_pixels": 64 * 64, "optim.warmup_steps": 0, "optim.scheduler": "constant",
        "train.output_dir": str(roots["out"]), "train.report_to": "none", "train.max_steps": 2,
        "train.micro_batch_size": 2, "train.save_every": 1, "train.log_every": 1,
    }
    if recipe == "dpo":
        overrides["dpo.precompute_ref_log_probs"] = "true"  # the reference cache goes to output_dir/ref_logps
    env = {**os.environ, "HOME": str(roots["home"]), "TMPDIR": str(roots["tmp"]), "HF_HOME": str(roots["hf_home"]),
           "XDG_CACHE_HOME": str(roots["xdg_cache"]), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(roots["xdg_cache"] / "matplotlib")}
    env.pop("MPLCONFIGDIR")  # matplotlib must find its cache under XDG_CACHE_HOME / HOME on its own
    log = tmp_path / "strace.log"
    log.touch()  # the test's own file
    before = sorted(media_dir.iterdir())  # media_dir is tmp_path: the data, the media and the folders above
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=%file",
                           sys.executable, str(REPO / "recipes" / f"{recipe}.py"),
                           *(f"{k}={v}" for k, v in overrides.items())],
                          cwd=roots["cwd"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (roots["out"] / "summary.json").is_file() and (roots["out"] / "final").is_dir()
    created = _created_paths(log, roots["cwd"])
    assert any(roots["out"] in p.parents for p in created), "the trace saw no write into output_dir"
    caches = [roots[k] for k in ("home", "tmp", "hf_home", "xdg_cache")]
    assert _outside(created, [roots["out"], *caches]) == []
    assert list(roots["cwd"].iterdir()) == []  # nothing in the working directory
    assert sorted(media_dir.iterdir()) == before  # nor beside the data
