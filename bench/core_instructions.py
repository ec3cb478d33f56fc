"""``python -m bench.core_instructions``: instructions per call in the sans-I/O core, counted by
valgrind (callgrind), so two builds can be compared exactly on a machine whose speed varies.

``bench.core_micro`` measures CPU time, which on a shared machine moves by 20-45 % from one minute to
the next; an instruction count does not move. This runs ``bench.core_micro`` under callgrind twice
(``--small`` and ``--large`` calls) and divides the difference by the extra calls, so start-up and
imports cancel out. The figure includes the harness's own parsing of what the core sends, as
core_micro's does. Needs valgrind (Debian: ``valgrind``); about a minute for the defaults.

    python -m bench.core_instructions                          # the pure-Python core (this tree)
    python -m bench.core_instructions --build .build/compiled  # the compiled core (make compiled)
    python -m bench.core_instructions --build /tmp/old         # another build, for a before/after
    python -m bench.core_instructions --refusals --small 2000 --large 12000   # per overload refusal
    python -m bench.core_instructions --bare    # without the finished call's metrics and log line
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(build: str, calls: int, refusals: bool = False, bare: bool = False) -> int:
    """Instructions executed by ``python -m bench.core_micro --calls N`` under callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("bench.core_instructions: valgrind is not installed (apt-get install valgrind)")
    path = os.pathsep.join([*([str(Path(build).resolve())] if build else []), str(REPO)])
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-P",
           "-m", "bench.core_micro", "--calls", str(calls)]  # fmt: skip
    if refusals:
        cmd.append("--refusals")
    if bare:
        cmd.append("--bare")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=False, timeout=1800)
    m = _COLLECTED.search(out.stderr)
    if out.returncode != 0 or m is None:
        sys.exit(f"bench.core_instructions: callgrind run failed ({out.returncode}):\n"
                 f"{out.stderr.decode(errors='replace')[-2000:]}")  # fmt: skip
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="", help="a build directory put first on PYTHONPATH ('' = this tree)")
    p.add_argument("--small", type=int, default=300)
    p.add_argument("--large", type=int, default=1300)
    p.add_argument("--refusals", action="store_true", help="per INVITE refused by overload control instead")
    p.add_argument(
        "--bare", action="store_true", help="core_micro --bare: no metrics recorder, no call log line"
    )
    a = p.parse_args(argv)
    if a.large <= a.small:
        p.error("--large must be more than --small")
    small = instructions(a.build, a.small, a.refusals, a.bare)
    large = instructions(a.build, a.large, a.refusals, a.bare)
    per_call = (large - small) / (a.large - a.small)
    what = (
        "refused INVITE" if a.refusals else "call" + (" (bare: no recorder, no log line)" if a.bare else "")
    )
    print(f"{a.build or 'this tree (pure)'}: {per_call / 1e6:.3f} M instructions per {what} "
          f"(callgrind, {a.small} and {a.large} calls)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
