"""Parsing SIPp's output files and rendering the benchmark's results (pure functions, no processes).

- :func:`parse_stat_csv`: SIPp ``-trace_stat`` CSV (``;``-separated, one row per ``-fd`` period,
  cumulative ``(C)`` columns) -> list of dicts.
- :func:`parse_rtt_csv`: SIPp ``-trace_rtt`` CSV (``Date_ms;response_time_ms;rtd_no``) -> samples.
- :func:`percentile`, :func:`achieved_cps`: the figures of a step.
- :func:`render_markdown`: the results JSON -> the tables of bench/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# SIPp files
# ---------------------------------------------------------------------------------------------


def parse_stat_csv(text: str) -> list[dict[str, str]]:
    """Rows of a SIPp statistics CSV as dicts keyed by the header line's column names."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    names = [n.strip() for n in lines[0].rstrip(";").split(";")]
    rows = []
    for ln in lines[1:]:
        values = ln.rstrip(";").split(";")
        rows.append({n: v.strip() for n, v in zip(names, values, strict=False)})
    return rows


def stat_int(row: dict[str, str] | None, name: str) -> int:
    """An integer counter from a stat row (0 when absent or empty)."""
    if not row:
        return 0
    try:
        return int(float(row.get(name, "0") or 0))
    except ValueError:
        return 0


@dataclass(frozen=True)
class RttSample:
    at_ms: float  # time since SIPp started, ms
    rtt_ms: float  # the response time (INVITE -> final), ms
    rtd: str  # which timer


def parse_rtt_csv(text: str) -> list[RttSample]:
    """Samples of a SIPp ``-trace_rtt`` file; the header line and malformed lines are skipped."""
    out = []
    for ln in text.splitlines():
        parts = ln.strip().split(";")
        if len(parts) < 3:
            continue
        try:
            out.append(RttSample(float(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError:
            continue
    return out


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(p / 100.0 * len(s)))
    return float(s[min(k, len(s)) - 1])


def achieved_cps(samples: Sequence[RttSample]) -> float:
    """Calls per second at which call setups completed: (n - 1) / (last - first completion time).

    A setup completes at ``at_ms`` (SIPp stamps the sample when the final response arrives), so
    when the proxy cannot keep up the completions spread out and this falls below the offered rate.
    """
    if len(samples) < 2:
        return 0.0
    times = sorted(s.at_ms for s in samples)
    span = (times[-1] - times[0]) / 1000.0
    return (len(times) - 1) / span if span > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------------


def parse_proc_stat_cpu_ticks(text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat (the comm may hold spaces)."""
    rest = text[text.rindex(")") + 2 :].split()
    # fields after "(comm)": state(3) ppid(4) ... utime(14) stime(15); rest[0] is field 3
    return int(rest[11]) + int(rest[12])


def parse_proc_stat_sys_ticks(text: str) -> int:
    """stime alone (clock ticks): the kernel's share, i.e. system calls and the network stack."""
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[12])


def parse_proc_stat_busy(text: str) -> int:
    """Busy clock ticks of all cores from /proc/stat's ``cpu`` line (user .. steal, less idle and iowait)."""
    for ln in text.splitlines():
        if ln.startswith("cpu "):
            f = [int(x) for x in ln.split()[1:9]]
            return sum(f) - f[3] - f[4]
    return 0


def parse_proc_status_kb(text: str, key: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM, ...) of /proc/PID/status, or of smaps_rollup (Pss, Rss)."""
    for ln in text.splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    target: str  # "ours" | "kamailio"
    pinned: bool
    kind: str  # "step" | "p80" | "half" | "mix" | "quick" | "overload" | "after"
    rate: int  # offered cps
    seconds: float  # offered duration
    calls: int = 0  # calls created by the switch
    ok: int = 0
    failed: int = 0
    retrans_switch: int = 0
    retrans_peers: int = 0  # ClearIP + carriers
    achieved_cps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: float = 0.0  # the proxy's CPU seconds during the step
    cpu_s_per_1k: float | None = None
    cpu_sys_s: float | None = None  # of cpu_s, in the kernel (system calls, loopback delivery)
    rss_kb: int = 0  # after the step (ours: VmRSS; Kamailio: sum of Pss of its processes)
    peak_rss_kb: int = 0  # ours: VmHWM; Kamailio: max of the sums seen
    sipp_cpu_util: float = 0.0  # load generator CPU seconds / wall seconds (1.0 = one core busy)
    other_load: float = 0.0  # cores busy with anything else on the machine during the step
    exit_code: int | None = None
    carried: int | None = None  # calls passed on to ClearIP, i.e. not refused (None: older runs)
    notes: list[str] = field(default_factory=list)

    @property
    def refused(self) -> int:
        """Calls the switch saw end (503) without reaching ClearIP: the proxy's own refusals.
        SIPp's switch scenario counts them as successful calls."""
        return 0 if self.carried is None else max(0, self.ok - self.carried)

    @property
    def completed_cps(self) -> float:
        """Calls carried (not refused) per offered second."""
        return (self.ok if self.carried is None else self.carried) / max(self.seconds, 0.001)

    @property
    def clean(self) -> bool:
        """Zero failed calls, none refused (a refused call is a failure for the zero-failure
        rate, though SIPp counts the 503 as a successful end), and kept up with the offered rate."""
        return (
            self.failed == 0
            and self.calls > 0
            and self.achieved_cps >= 0.9 * self.rate
            and (self.kind == "mix" or self.refused == 0)
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clean"] = self.clean
        d["refused"] = self.refused
        return d


@dataclass
class MemoryResult:
    target: str
    pinned: bool
    wanted: int
    ringing: int = 0  # calls seen ringing at the measurement
    idle_kb: int = 0
    loaded_kb: int = 0
    metric: str = "VmRSS"  # or "sum Pss"
    notes: list[str] = field(default_factory=list)

    @property
    def per_call_bytes(self) -> float | None:
        if self.ringing <= 0:
            return None
        return (self.loaded_kb - self.idle_kb) * 1024.0 / self.ringing

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_call_bytes"] = self.per_call_bytes
        return d


def zero_failure_cps(steps: Iterable[StepResult]) -> float:
    """The highest achieved cps of a clean step (0 when none was clean)."""
    return max((s.achieved_cps for s in steps if s.clean), default=0.0)


def cpu_per_1k_at_top(steps: Sequence[StepResult]) -> float | None:
    """CPU-seconds per 1,000 calls, from the clean steps of at least 250 cps (the rate-independent
    part of the cost; at low rates the idle loop and timers weigh in): the median of those steps."""
    vals = [s.cpu_s_per_1k for s in steps if s.clean and s.rate >= 250 and s.cpu_s_per_1k is not None]
    if not vals:
        vals = [s.cpu_s_per_1k for s in steps if s.clean and s.cpu_s_per_1k is not None]
    return percentile(vals, 50) if vals else None


def cpu_per_1k_at(steps: Sequence[StepResult], rate: int) -> float | None:
    """CPU-seconds per 1,000 calls at one offered rate (the steps at ``rate``, clean or not: issue
    16 compares the two proxies at 500 and at 1,000 cps whatever they carried); the median of the
    attempts."""
    vals = [s.cpu_s_per_1k for s in steps if s.rate == rate and s.cpu_s_per_1k is not None]
    return percentile(vals, 50) if vals else None


def _fmt(v: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None, spec: str = ".2f") -> str:
    if a is None or b is None or b == 0:
        return "-"
    return format(a / b, spec) + "x"


def step_table(steps: Sequence[StepResult]) -> list[str]:
    out = [
        "| proxy | pinned | run | offered cps | achieved cps | calls | failed | retrans switch/peers "
        "| setup p50 ms | setup p99 ms | CPU s / 1k calls | RSS MB (peak) | SIPp cores | other load |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in steps:
        out.append(
            f"| {s.target} | {'yes' if s.pinned else 'no'} | {s.kind} | {s.rate} | {s.achieved_cps:.0f} "
            f"| {s.calls} | {s.failed}{'' if s.clean else ' ✗'} | {s.retrans_switch}/{s.retrans_peers} "
            f"| {_fmt(s.p50_ms, '.0f')} | {_fmt(s.p99_ms, '.0f')} | {_fmt(s.cpu_s_per_1k, '.2f')} "
            f"| {s.rss_kb / 1024:.0f} ({s.peak_rss_kb / 1024:.0f}) | {s.sipp_cpu_util:.2f} "
            f"| {s.other_load:.2f} |"
        )
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios (ours / Kamailio) from the results JSON."""
    steps = [StepResult(**_step_fields(d)) for d in results.get("steps", [])]
    mems = [MemoryResult(**_mem_fields(d)) for d in results.get("memory", [])]

    def pick(target: str, pinned: bool, kind: str = "step") -> list[StepResult]:
        return [s for s in steps if s.target == target and s.pinned == pinned and s.kind == kind]

    out: dict[str, Any] = {}
    for pinned in (True, False):
        key = "pinned" if pinned else "unpinned"
        ours, kam = pick("ours", pinned), pick("kamailio", pinned)
        if not ours and not kam:
            continue
        o_cps, k_cps = zero_failure_cps(ours), zero_failure_cps(kam)
        o_cpu, k_cpu = cpu_per_1k_at_top(ours), cpu_per_1k_at_top(kam)
        entry: dict[str, Any] = {
            "ours_zero_failure_cps": o_cps,
            "kamailio_zero_failure_cps": k_cps,
            "cps_ratio": (o_cps / k_cps) if k_cps else None,
            "ours_cpu_s_per_1k": o_cpu,
            "kamailio_cpu_s_per_1k": k_cpu,
            "cpu_ratio": (o_cpu / k_cpu) if (o_cpu is not None and k_cpu) else None,
        }
        for rate in (500, 1000):
            o_at, k_at = cpu_per_1k_at(ours, rate), cpu_per_1k_at(kam, rate)
            entry[f"ours_cpu_s_per_1k_at_{rate}"] = o_at
            entry[f"kamailio_cpu_s_per_1k_at_{rate}"] = k_at
            entry[f"cpu_ratio_at_{rate}"] = (o_at / k_at) if (o_at is not None and k_at) else None
        for name in ("ours", "kamailio"):
            for kind in ("half", "p80"):
                runs = pick(name, pinned, kind)
                if runs:
                    entry[f"{name}_{kind}_rate"] = runs[-1].rate
                    entry[f"{name}_{kind}_p99_ms"] = runs[-1].p99_ms
                    entry[f"{name}_{kind}_failed"] = runs[-1].failed
            zero = o_cps if name == "ours" else k_cps
            carried = [s.completed_cps / zero for s in pick(name, pinned, "overload") if zero]
            if carried:
                entry[f"{name}_overload_carried_min"] = min(carried)
        out[key] = entry
    for m in mems:
        out.setdefault("memory", {})[m.target] = m.per_call_bytes
    if out.get("memory", {}).get("ours") and out["memory"].get("kamailio"):
        out["memory"]["ratio"] = out["memory"]["ours"] / out["memory"]["kamailio"]
    return out


def overload_table(steps: Sequence[StepResult]) -> list[str]:
    """Each overload step (offered 1.5x / 2x the proxy's own zero-failure rate for 10 s) beside
    the calm run right after it in the same processes."""
    out = [
        "| proxy | offered cps | completed cps | refused (503) | failed | retrans switch/peers "
        "| setup p50 / p99 ms | then at half rate: failed, p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for i, s in enumerate(steps):
        if s.kind != "overload":
            continue
        after = steps[i + 1] if i + 1 < len(steps) and steps[i + 1].kind == "after" else None
        tail = (
            "-"
            if after is None
            else f"{after.failed}{'' if after.clean else ' ✗'}, {_fmt(after.p99_ms, '.0f')}"
        )
        out.append(
            f"| {s.target} | {s.rate} | {s.completed_cps:.0f} | {s.refused} | {s.failed} "
            f"| {s.retrans_switch}/{s.retrans_peers} "
            f"| {_fmt(s.p50_ms, '.0f')} / {_fmt(s.p99_ms, '.0f')} | {tail} |"
        )
    return out


def _step_fields(d: dict[str, Any]) -> dict[str, Any]:
    names = StepResult.__dataclass_fields__
    return {k: v for k, v in d.items() if k in names}


def _mem_fields(d: dict[str, Any]) -> dict[str, Any]:
    names = MemoryResult.__dataclass_fields__
    return {k: v for k, v in d.items() if k in names}


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def render_markdown(results: dict[str, Any]) -> str:
    """The results section of bench/README.md."""
    s = summary(results)
    steps = [StepResult(**_step_fields(d)) for d in results.get("steps", [])]
    mems = [MemoryResult(**_mem_fields(d)) for d in results.get("memory", [])]
    m = results.get("machine", {})
    lines = [
        f"Measured {results.get('started', '?')} with `{results.get('command', 'python -m bench')}` "
        f"({results.get('wall_s', 0):.0f} s).",
        "",
        f"Machine: {m.get('nproc', '?')} cores, {m.get('cpu_model', '?')}, {m.get('mem_gb', '?')} GB; "
        f"Python {m.get('python', '?')} (ours: {m.get('build', 'pure')} core), "
        f"uvloop {m.get('uvloop', '?')}, SIPp {m.get('sipp', '?')}, "
        f"Kamailio {m.get('kamailio', '?')}, Linux {m.get('kernel', '?')}.",
        "",
        f"Machine noise at the start: load average {m.get('loadavg_at_start', '?')}, 1 ms sleeps woke "
        f"{_fmt((m.get('wake_latency_ms_at_start') or {}).get('p99'), '.1f')} ms late at p99 "
        f"({_fmt((m.get('wake_latency_ms_at_start') or {}).get('max'), '.0f')} ms at worst). "
        "The *other load* column is the CPU (in cores) that everything else on the machine used "
        "during each run.",
        "",
        "### Headline (pinned: proxy on core 0, every SIPp on core 1)",
        "",
        "| figure | ours | Kamailio | ratio | target | verdict |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    p = s.get("pinned", {})
    mem = s.get("memory", {})
    cps_ratio = p.get("cps_ratio")
    p80 = p.get("ours_p80_p99_ms")
    mem_ours = mem.get("ours")
    carried = p.get("ours_overload_carried_min")
    k_carried = p.get("kamailio_overload_carried_min")
    lines += [
        f"| zero-failure cps | {_fmt(p.get('ours_zero_failure_cps'), '.0f')} "
        f"| {_fmt(p.get('kamailio_zero_failure_cps'), '.0f')} | {_fmt(cps_ratio, '.2f')} | ≥ 1.00 "
        f"| {verdict(None if cps_ratio is None else cps_ratio >= 1.0)} |",
    ]
    for rate in (500, 1000):
        r = p.get(f"cpu_ratio_at_{rate}")
        lines.append(
            f"| CPU s per 1,000 calls at {rate:,} cps offered "
            f"| {_fmt(p.get(f'ours_cpu_s_per_1k_at_{rate}'), '.2f')} "
            f"| {_fmt(p.get(f'kamailio_cpu_s_per_1k_at_{rate}'), '.2f')} | {_fmt(r, '.2f')} | ≤ 1.20 "
            f"| {verdict(None if r is None else r <= 1.2)} |"
        )
    lines += [
        "| CPU s per 1,000 calls, median of clean steps ≥ 250 cps "
        f"| {_fmt(p.get('ours_cpu_s_per_1k'), '.2f')} "
        f"| {_fmt(p.get('kamailio_cpu_s_per_1k'), '.2f')} | {_fmt(p.get('cpu_ratio'), '.2f')} | - | - |",
        f"| setup p99 ms at 80 % of the own zero-failure rate (ours {p.get('ours_p80_rate', '-')} cps, "
        f"Kamailio {p.get('kamailio_p80_rate', '-')} cps) | {_fmt(p80, '.0f')} "
        f"| {_fmt(p.get('kamailio_p80_p99_ms'), '.0f')} | {_ratio(p80, p.get('kamailio_p80_p99_ms'))} "
        f"| < 20 ms | {verdict(None if p80 is None else p80 < 20 and not p.get('ours_p80_failed'))} |",
        "| calls carried offered 1.5x and 2x the own zero-failure rate (the lower), % of that rate "
        f"| {_fmt(None if carried is None else 100 * carried, '.0f')} % "
        f"| {_fmt(None if k_carried is None else 100 * k_carried, '.0f')} % | - | ≥ 90 % "
        f"| {verdict(None if carried is None else carried >= 0.9)} |",
        "| memory per concurrent ringing call "
        f"| {_fmt(None if mem_ours is None else mem_ours / 1024, '.1f')} KB "
        f"| {_fmt(None if mem.get('kamailio') is None else mem['kamailio'] / 1024, '.1f')} KB "
        f"| {_fmt(mem.get('ratio'), '.2f')} | < 10 KB "
        f"| {verdict(None if mem_ours is None else mem_ours < 10 * 1024)} |",
    ]
    u = s.get("unpinned")
    if u:
        lines += [
            "",
            f"Unpinned: ours {_fmt(u.get('ours_zero_failure_cps'), '.0f')} cps, Kamailio "
            f"{_fmt(u.get('kamailio_zero_failure_cps'), '.0f')} cps zero-failure "
            f"(ratio {_fmt(u.get('cps_ratio'), '.2f')}); CPU s / 1k calls ours "
            f"{_fmt(u.get('ours_cpu_s_per_1k'), '.2f')}, "
            f"Kamailio {_fmt(u.get('kamailio_cpu_s_per_1k'), '.2f')}.",
        ]
    if any(s.kind == "overload" for s in steps):
        lines += ["", "### Overload (pinned): offered past each proxy's own zero-failure rate", ""]
        lines += overload_table(steps)
    lines += ["", "### Every run", "", *step_table(steps)]
    if mems:
        lines += [
            "",
            "### Memory: concurrent calls held ringing (carrier answers 180 and holds)",
            "",
            "| proxy | pinned | wanted | ringing | idle MB | loaded MB | per call | measured as |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for mr in mems:
            pc = mr.per_call_bytes
            lines.append(
                f"| {mr.target} | {'yes' if mr.pinned else 'no'} | {mr.wanted} | {mr.ringing} "
                f"| {mr.idle_kb / 1024:.1f} | {mr.loaded_kb / 1024:.1f} "
                f"| {_fmt(None if pc is None else pc / 1024, '.1f')} KB | {mr.metric} |"
            )
    notes = [n for st in steps for n in st.notes] + [n for mr in mems for n in mr.notes]
    notes += results.get("notes", [])
    if notes:
        lines += ["", "Notes from this run:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def splice_readme(readme: str, section: str) -> str:
    """Replace the text between the results markers of the README (append them when absent)."""
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in readme and END in readme:
        head, _, rest = readme.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block + tail
    return readme.rstrip("\n") + "\n\n" + block + "\n"


def write_readme(path: Path, results: dict[str, Any]) -> None:
    text = path.read_text() if path.exists() else "# Load benchmark\n"
    path.write_text(splice_readme(text, render_markdown(results)))
