"""Run a snippet of Python in a child process with this test run's ``sys.path``: for tests of
process-wide set-up (logging, the garbage collector) that must not change pytest's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_json(code: str, timeout: float = 120) -> Any:
    """Run ``code`` (``python -P -c``, from the repository) and decode the JSON it prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
