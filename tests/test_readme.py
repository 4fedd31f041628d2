"""The README's research-code block runs as written (outputs redirected to a temp folder)."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_research_code_block_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("In research code"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("outputs/research", str(tmp_path / "research"))
    code += "\nassert len(result.losses) == 20 and result.losses[-1] < result.losses[0]\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "research" / "final" / "model.safetensors").is_file()
