"""``python -m bench --profile``: ours under load (pinned, one rate), sampled by py-spy.

py-spy is not a project requirement: ``.venv/bin/pip install py-spy`` first. It samples the proxy
from outside (``--nonblocking``: the proxy is never paused) and writes collapsed stacks; this module
turns them into the top functions by self time and by inclusive time, in the run's directory
(``profile.txt``, ``profile.folded``; the folded file loads into speedscope or flamegraph.pl).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs, run

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_folded(text: str) -> tuple[Counter[str], Counter[str], int]:
    """Collapsed stacks (``a;b;c N``) -> (self samples per function, inclusive samples, total)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for ln in text.splitlines():
        stack, _, n = ln.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_name(f) for f in stack.split(";") if f]
        # the thread / process frame py-spy puts first is not a function
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    return self_c, incl, total


def _name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines merged, paths shortened."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("/proxy_runtime/", "/lib/python3", "/site-packages/"):
        if marker in f:
            f = f[f.index(marker) + 1 :]
            break
    return f"{m.group('func')} ({f})"


def render(self_c: Counter[str], incl: Counter[str], total: int, top: int = 20) -> str:
    out = [f"{total} samples (while busy)", "", "top by self time:"]
    for name, n in self_c.most_common(top):
        out.append(f"  {100.0 * n / max(total, 1):5.1f}%  {name}")
    out += ["", "top by inclusive time:"]
    for name, n in incl.most_common(top):
        out.append(f"  {100.0 * n / max(total, 1):5.1f}%  {name}")
    return "\n".join(out) + "\n"


def main(bench: Any) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not spy:
        bench.note("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return
    a = bench.args
    wd = bench.wd("ours-profile")
    with run.session("ours", True, wd) as s:
        assert s.target is not None
        folded = wd / "profile.folded"
        sampler = procs.Proc(
            "py-spy",
            [
                *procs.pin("1"),
                spy,
                "record",
                "--pid",
                str(s.target.pids()[0]),
                "--rate",
                "250",
                "--duration",
                str(int(a.profile_seconds + 2)),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(folded),
            ],
            wd,
            wd / "py-spy.log",
        )
        r = s.run_rate("step", a.profile_rate, a.profile_seconds)
        bench.log_step(r)
        sampler.wait(15)
        sampler.stop()
    if not folded.exists():
        bench.note(f"py-spy wrote no profile: {sampler.tail()}")
        return
    self_c, incl, total = parse_folded(folded.read_text())
    text = render(self_c, incl, total)
    (wd / "profile.txt").write_text(text)
    bench.results["profile"] = {
        "rate": a.profile_rate,
        "samples": total,
        "self": self_c.most_common(30),
        "inclusive": incl.most_common(30),
    }
    print(text, flush=True)
