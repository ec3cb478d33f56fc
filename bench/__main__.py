"""``python -m bench`` (``make bench``): the load benchmark, ours beside Kamailio. See bench/README.md.

    python -m bench                 # the full run (< 10 min): results table in bench/README.md
    python -m bench --quick         # one short step each, ours and Kamailio (< 90 s); JSON only
    python -m bench --profile       # ours under load with py-spy attached: the hot spots
    python -m bench --no-kamailio   # ours alone (no reference ratios)

Raw results: bench/results/<timestamp>.json (gitignored), and each run's SIPp files under
bench/results/<timestamp>/ (stat CSVs, response times, error logs, proxy / Kamailio output).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procs, report, run

HERE = Path(__file__).resolve().parent
DEFAULT_STEPS = "100,250,500,750,875,1000,1125,1250,1375,1500,2000"
DEFAULT_UNPINNED_STEPS = "500,1000,1500,2000,2500"
BUDGET_S = 560.0  # stop starting phases past this: make bench must end within 10 minutes


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def wake_latency_ms(seconds: float = 2.0) -> dict[str, float]:
    """How late 1 ms sleeps wake up on this machine now: a noisy (shared, overcommitted) machine
    shows tens to hundreds of ms, and every latency figure of the run inherits that."""
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        time.sleep(0.001)
        lat.append((time.monotonic() - t - 0.001) * 1000)
    return {
        "p50": report.percentile(lat, 50) or 0.0,
        "p99": report.percentile(lat, 99) or 0.0,
        "max": max(lat, default=0.0),
    }


def use_build(build: str) -> None:
    """Run ours as ``build``: for ``compiled``, (re)make .build/compiled (`make compiled`: nothing to
    do when it is up to date) and have procs.py start the proxy from it."""
    if build == "pure":
        os.environ.pop("CLEARIP_COMPILED_DIR", None)
        return
    made = subprocess.run(["make", "--no-print-directory", "-s", "compiled"], cwd=procs.REPO, check=False)
    if made.returncode != 0:
        sys.exit("bench: `make compiled` failed (a C compiler and the Python headers are needed); "
                 "or measure the pure-Python build with --build pure")  # fmt: skip
    os.environ["CLEARIP_COMPILED_DIR"] = str(procs.COMPILED)


def machine() -> dict[str, Any]:
    model = "?"
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            model = ln.split(":", 1)[1].strip()
            break
    mem_kb = report.parse_proc_status_kb(Path("/proc/meminfo").read_text(), "MemTotal")
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": round(mem_kb / 1024 / 1024),
        "python": platform.python_version(),
        "build": "compiled" if os.environ.get("CLEARIP_COMPILED_DIR") else "pure",
        "uvloop": uv,
        "sipp": _version([procs.SIPP, "-v"], r"SIPp (v[\w.\-]+)"),
        "kamailio": _version([procs.KAMAILIO, "-v"], r"version: kamailio ([\d.]+)"),
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[0],
        "wake_latency_ms_at_start": wake_latency_ms(),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out)
        self.workdir = self.out / stamp
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / f"{stamp}.json"
        self.results: dict[str, Any] = {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python -m bench",
            "machine": machine(),
            "steps": [],
            "memory": [],
            "notes": [],
        }
        self.kinds = (
            ["ours"] if args.no_kamailio or not shutil.which(procs.KAMAILIO) else ["ours", "kamailio"]
        )
        if "kamailio" not in self.kinds and not args.no_kamailio:
            self.note("Kamailio is not installed (apt-get install -y kamailio): no reference run")

    # --- helpers -----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, text: str) -> None:
        print(f"[bench] note: {text}", flush=True)
        self.results["notes"].append(text)

    def budget_left(self, need: float, what: str) -> bool:
        if self.elapsed() + need > self.args.budget:
            self.note(f"skipped {what}: the run's time budget ({self.args.budget:.0f} s) would be exceeded")
            return False
        return True

    def log_step(self, r: report.StepResult) -> None:
        self.results["steps"].append(r.to_json())
        sys_share = "" if r.cpu_sys_s is None or not r.cpu_s else f" ({100 * r.cpu_sys_s / r.cpu_s:.0f}% sys)"
        print(
            f"[bench] {self.elapsed():5.0f}s {r.target:8} {'pinned' if r.pinned else 'unpinned':8} "
            f"{r.kind:5} {r.rate:5} cps: achieved {r.achieved_cps:6.0f}, calls {r.calls}, "
            f"failed {r.failed}, retrans "
            f"{r.retrans_switch}/{r.retrans_peers}, p50/p99 {r.p50_ms}/{r.p99_ms} ms, "
            f"CPU {r.cpu_s_per_1k and round(r.cpu_s_per_1k, 3)} s/1k{sys_share}, RSS {r.rss_kb // 1024} MB, "
            f"SIPp {r.sipp_cpu_util:.2f} core, other {r.other_load:.2f}{'' if r.clean else '  <- not clean'}",
            flush=True,
        )
        for n in r.notes:
            print(f"[bench]   {n}", flush=True)
        self.save()

    def save(self) -> None:
        self.results["wall_s"] = self.elapsed()
        self.json_path.write_text(json.dumps(self.results, indent=2))

    def wd(self, name: str) -> Path:
        return self.workdir / name

    # --- phases ------------------------------------------------------------------------------------
    def smoke(self) -> None:
        for kind in self.kinds:
            problems = run.smoke(kind, True, self.wd(f"{kind}-smoke"))
            status = "ok" if not problems else "; ".join(problems)
            print(f"[bench] {self.elapsed():5.0f}s smoke {kind}: {status}", flush=True)
            for p in problems:
                self.note(f"smoke: {p}")

    def one_step(self, kind: str, pinned: bool, rate: int, seconds: float, attempt: int) -> report.StepResult:
        tag = "pinned" if pinned else "unpinned"
        with run.session(kind, pinned, self.wd(f"{kind}-{tag}-{rate}-{attempt}")) as s:
            r = s.run_rate("step", rate, seconds)
        if attempt > 1:
            r.notes.append(f"{kind} {tag} {rate} cps: attempt {attempt} (the first had failures)")
        self.log_step(r)
        if pinned and r.sipp_cpu_util > 0.9:
            self.note(
                f"{kind} {tag} {rate} cps: SIPp used {r.sipp_cpu_util:.2f} of its core; the load "
                "generator may be the limit at this rate"
            )
        return r

    def stepped(self, pinned: bool, rates: list[int], seconds: float) -> dict[str, list[report.StepResult]]:
        """Ours and Kamailio alternately at each rate (each step a fresh session, seconds apart, so
        both see the same machine); a target stops at its first rate that fails twice."""
        out: dict[str, list[report.StepResult]] = {k: [] for k in self.kinds}
        active = list(self.kinds)
        tag = "pinned" if pinned else "unpinned"
        for rate in rates:
            for kind in list(active):
                if not self.budget_left(seconds + 6, f"{kind} {tag} step {rate} cps"):
                    return out
                r = self.one_step(kind, pinned, rate, seconds, 1)
                out[kind].append(r)
                if not r.clean and self.args.retries > 0 and self.budget_left(seconds + 6, "a retry"):
                    r = self.one_step(kind, pinned, rate, seconds, 2)
                    out[kind].append(r)
                if not r.clean:
                    active.remove(kind)
            if not active:
                break
        return out

    def half_and_mix(self, kind: str, zero_fail: float, seconds: float) -> None:
        """80 % of the zero-failure rate (issue 16: setup p99 < 20 ms there), then half of it, then
        half with ClearIP answering 503 to 3 calls in 10."""
        rate = max(50, round(zero_fail / 2 / 10.0) * 10)
        if not self.budget_left(3 * seconds + 14, f"{kind} 80 %, half-rate and 503-mix runs"):
            return
        with run.session(kind, True, self.wd(f"{kind}-pinned-p80")) as s:
            self.log_step(s.run_rate("p80", max(50, round(zero_fail * 0.8 / 10.0) * 10), seconds))
        with run.session(kind, True, self.wd(f"{kind}-pinned-half")) as s:
            self.log_step(s.run_rate("half", rate, seconds))
            time.sleep(1.0)
            self.log_step(s.run_rate("mix", rate, seconds, mix503=True))

    def overload(self, kind: str, zero_fail: float) -> None:
        """Offered 1.5x and 2x the proxy's own zero-failure rate for 10 s (issue 16), each in a
        fresh session, then half the zero-failure rate for 5 s in the same processes: past
        capacity calls completed should stay >= 90 % of the zero-failure rate, every other INVITE
        answered at once (503), and the calm run right after should have no failure."""
        for factor in self.args.overload_factors:
            rate = int(round(zero_fail * factor / 10.0) * 10)
            seconds = self.args.overload_seconds
            if not self.budget_left(seconds + 5 + 40, f"{kind} overload {factor}x"):
                return
            with run.session(kind, True, self.wd(f"{kind}-pinned-overload-{factor}")) as s:
                self.log_step(s.run_rate("overload", rate, seconds))
                self.log_step(s.run_rate("after", max(50, int(zero_fail / 2)), 5.0))

    def memory(self, kind: str, zero_fail: float) -> None:
        # Ringing calls are lighter than full calls (no ACK/BYE): ramp at 400 cps or more so the
        # run reaches --memory-calls (10,000 by default) within about 25 s.
        rate = int(min(1000, max(400, 0.8 * zero_fail)))
        n = int(min(self.args.memory_calls, rate * 25))
        if not self.budget_left(n / rate + 20, f"{kind} memory run"):
            return
        with run.session(kind, True, self.wd(f"{kind}-pinned-memory"), carrier_hold_ms=120_000) as s:
            m = s.run_memory(n, rate)
        self.results["memory"].append(m.to_json())
        pc = m.per_call_bytes
        print(
            f"[bench] {self.elapsed():5.0f}s memory {kind}: {m.ringing}/{n} ringing, "
            f"idle {m.idle_kb // 1024} MB, loaded {m.loaded_kb // 1024} MB "
            f"-> {pc and round(pc / 1024, 2)} KB per call ({m.metric})",
            flush=True,
        )
        for t in m.notes:
            print(f"[bench]   {t}", flush=True)
        self.save()

    # --- the two modes -----------------------------------------------------------------------------
    def full(self) -> None:
        a = self.args
        rates = [int(x) for x in a.steps.split(",")]
        urates = [int(x) for x in a.unpinned_steps.split(",")]
        self.smoke()
        if a.zero_failure:
            # Given, not measured: the later phases (overload, memory) at a known rate.
            self.note(f"zero-failure rate given as {a.zero_failure} cps (--zero-failure): no pinned steps")
            zero = dict.fromkeys(self.kinds, float(a.zero_failure))
        else:
            pinned = self.stepped(True, rates, a.step_seconds)
            zero = {kind: report.zero_failure_cps(pinned[kind]) for kind in self.kinds}
        for kind in self.kinds:
            if a.no_half:
                break
            if zero[kind] > 0:
                self.half_and_mix(kind, zero[kind], a.step_seconds)
            else:
                self.note(f"{kind}: no clean pinned step, so no half-rate / mix runs")
        if not a.no_overload:
            for kind in self.kinds:
                if zero[kind] > 0:
                    self.overload(kind, zero[kind])
        for kind in self.kinds:
            if not a.no_memory:
                self.memory(kind, zero[kind])
        if not a.no_unpinned:
            self.stepped(False, urates, a.unpinned_seconds)
        self.results["summary"] = report.summary(self.results)
        self.save()
        if not a.no_readme:
            report.write_readme(Path(a.readme), self.results)
            print(f"[bench] results table written to {a.readme}", flush=True)

    def quick(self) -> None:
        self.smoke()
        for kind in self.kinds:
            with run.session(kind, True, self.wd(f"{kind}-quick")) as s:
                self.log_step(s.run_rate("quick", self.args.quick_rate, self.args.quick_seconds))
        self.results["summary"] = report.summary(self.results)
        self.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke + one short step each (< 90 s)")
    p.add_argument("--profile", action="store_true", help="ours under load with py-spy: the hot spots")
    p.add_argument("--no-kamailio", action="store_true", help="skip the reference runs")
    p.add_argument("--no-unpinned", action="store_true", help="skip the unpinned steps")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md's table")
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"pinned rates, cps (default {DEFAULT_STEPS})")
    p.add_argument("--unpinned-steps", default=DEFAULT_UNPINNED_STEPS)
    p.add_argument("--step-seconds", type=float, default=8.0)
    p.add_argument("--unpinned-seconds", type=float, default=6.0)
    p.add_argument("--retries", type=int, default=1, help="re-runs of a step that failed (noise guard)")
    p.add_argument("--memory-calls", type=int, default=10_000)
    p.add_argument("--no-overload", action="store_true", help="skip the 1.5x / 2x overload runs")
    p.add_argument("--overload-seconds", type=float, default=10.0)
    p.add_argument(
        "--overload-factors",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1.5, 2.0],
        help="overload runs at these multiples of the zero-failure rate (default 1.5,2)",
    )
    p.add_argument(
        "--zero-failure",
        type=int,
        default=0,
        metavar="CPS",
        help="take this as the zero-failure rate and skip the pinned steps (overload runs alone)",
    )
    p.add_argument("--no-half", action="store_true", help="skip the half-rate and 503-mix runs")
    p.add_argument("--no-memory", action="store_true", help="skip the ringing-memory run")
    p.add_argument("--quick-rate", type=int, default=300)
    p.add_argument("--quick-seconds", type=float, default=5.0)
    p.add_argument("--profile-rate", type=int, default=300)
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which no phase starts")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--readme", default=str(HERE / "README.md"))
    p.add_argument(
        "--build",
        choices=("compiled", "pure"),
        default="compiled",
        help="ours as the mypyc-compiled core (`make compiled`, run first; the default: what deploys) "
        "or the pure-Python one",
    )
    args = p.parse_args(argv)
    use_build(args.build)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    print(f"[bench] {bench.results['machine']}; files in {bench.workdir}", flush=True)
    try:
        if args.profile:
            from bench import profile

            profile.main(bench)
        elif args.quick:
            bench.quick()
        else:
            bench.full()
    except KeyboardInterrupt:
        print("[bench] interrupted: stopping everything", flush=True)
        return 130
    finally:
        procs.stop_all()
        bench.save()
    print(f"[bench] done in {bench.elapsed():.0f} s; raw results {bench.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
