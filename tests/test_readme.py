"""The README's research-code block runs as written (outputs redirected to a temp folder)."""

import os
import re
import subprocess
import sys

from conftest import REPO


def _block(after: str) -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index(after):], re.S).group(1)


def test_research_code_block_runs_and_its_export_answers_in_plain_transformers(tmp_path):
    """The research block trains and exports; the plain-transformers block then answers from that export with the
    same greedy reply as vltrain's own batched generation on the same sample."""
    code = _block("In research code").replace("outputs/research", str(tmp_path / "research"))
    code += "\nassert len(result.losses) == 20 and result.losses[-1] < result.losses[0]\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "research" / "final" / "model.safetensors").is_file()

    inference = _block("With plain transformers").replace("outputs/demo", str(tmp_path / "research"))
    inference += f"""
from vltrain.data.formats import load_conversations
from vltrain.evaluate import prompt_and_answer
from vltrain.generation import GenerationSettings, generate
from vltrain.inference import load_trained

trained = load_trained({str(tmp_path / "research" / "final")!r})
conv = next(c for c in load_conversations({str(tmp_path / "research" / "data" / "eval.json")!r}) if c.sample_id == "eval-67")
(reply,) = generate(trained.model, trained.processor, [prompt_and_answer(conv)[0]], GenerationSettings(max_new_tokens=16),
                    media=trained.media, image_folder={str(tmp_path / "research" / "data" / "images")!r}, show_progress=False)
ours = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
assert ours == reply.text, (ours, reply.text)
print("SAME:", ours)
"""
    proc = subprocess.run([sys.executable, "-c", inference], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SAME:" in proc.stdout
