"""Helper for the recipes' SIGTERM tests (test_dpo.py, test_grpo.py, test_cls.py): run a recipe in its own process
group and send SIGTERM to the group once its log shows a given step.

    rc, output = sigterm_at(REPO / "recipes" / "dpo.py", args, "step  3/40")
"""

import os
import signal
import subprocess
import sys
import time


def sigterm_at(script, args: list[str], line_text: str, *, timeout: float = 150) -> tuple[int, str]:
    """(exit code, everything the run printed) of `python script args`, SIGTERM-ed at the first line holding
    `line_text`; fails the test if no such line comes within `timeout` seconds."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=repo, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line_text in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out
