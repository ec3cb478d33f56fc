"""The benchmark's parsing and report code (bench/report.py, bench/profile.py): no processes, no load."""

from __future__ import annotations

from bench import report
from bench.profile import parse_folded
from bench.report import MemoryResult, StepResult
from bench.run import IDENTITY, make_identity, write_inf

STAT_CSV = (
    "StartTime;LastResetTime;CurrentTime;ElapsedTime(C);TargetRate;TotalCallCreated;CurrentCall;"
    "SuccessfulCall(C);FailedCall(C);Retransmissions(C);\n"
    "2026-11-26\t12:45:35.4;2026-11-26\t12:45:35.4;2026-11-26\t12:45:36.4;00:00:01;5;4;1;3;0;0;\n"
    "2026-11-26\t12:45:35.4;2026-11-26\t12:45:36.4;2026-11-26\t12:45:37.4;00:00:02;5;10;0;9;1;7;\n"
)

RTT_CSV = "Date_ms;response_time_ms;rtd_no\n212.001;8;1\n412.001;9;1\nbroken line\n1012;30;1\n"


def test_stat_csv_rows_and_counters() -> None:
    rows = report.parse_stat_csv(STAT_CSV)
    assert len(rows) == 2
    last = rows[-1]
    assert report.stat_int(last, "TotalCallCreated") == 10
    assert report.stat_int(last, "FailedCall(C)") == 1
    assert report.stat_int(last, "Retransmissions(C)") == 7
    assert report.stat_int(last, "NoSuchColumn") == 0
    assert report.stat_int(None, "FailedCall(C)") == 0
    assert report.parse_stat_csv("") == []


def test_rtt_percentiles_and_achieved_rate() -> None:
    samples = report.parse_rtt_csv(RTT_CSV)
    assert [s.rtt_ms for s in samples] == [8.0, 9.0, 30.0]
    assert report.percentile([s.rtt_ms for s in samples], 50) == 9.0
    assert report.percentile([s.rtt_ms for s in samples], 99) == 30.0
    assert report.percentile([], 99) is None
    assert report.percentile(list(range(1, 101)), 99) == 99.0
    # 3 completions over 0.8 s: 2 intervals -> 2.5 cps
    assert abs(report.achieved_cps(samples) - 2 / 0.799999) < 1e-3
    assert report.achieved_cps(samples[:1]) == 0.0


def test_proc_parsers() -> None:
    stat = "1234 (python -m x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 10 1000 200\n"
    assert report.parse_proc_stat_cpu_ticks(stat) == 300
    status = "Name:\tpython\nVmHWM:\t  81234 kB\nVmRSS:\t  70000 kB\n"
    assert report.parse_proc_status_kb(status, "VmRSS") == 70000
    assert report.parse_proc_status_kb(status, "VmHWM") == 81234
    assert report.parse_proc_status_kb(status, "Pss") == 0
    cpu = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n"
    assert report.parse_proc_stat_busy(cpu) == 100 + 5 + 50 + 1 + 2 + 3


def _step(target: str, rate: int, achieved: float, failed: int = 0, **kw: object) -> StepResult:
    s = StepResult(target, True, str(kw.pop("kind", "step")), rate, 10.0)
    s.calls, s.failed, s.achieved_cps = rate * 10, failed, achieved
    s.cpu_s_per_1k = float(kw.pop("cpu", 1.0))  # type: ignore[arg-type]
    s.p99_ms = kw.pop("p99", None)  # type: ignore[assignment]
    return s


def test_clean_steps_and_summary_ratios() -> None:
    ours = [
        _step("ours", 250, 250, cpu=1.2),
        _step("ours", 500, 499, cpu=1.4),
        _step("ours", 750, 600, cpu=1.6),
    ]
    assert [s.clean for s in ours] == [True, True, False]  # 600 < 0.9 * 750: could not keep up
    kam = [
        _step("kamailio", 500, 500, cpu=0.7),
        _step("kamailio", 1000, 1000, cpu=0.7),
        _step("kamailio", 1500, 1500, failed=3, cpu=0.7),
    ]
    half = [
        _step("ours", 400, 400, kind="p80", p99=25.0),
        _step("kamailio", 800, 800, kind="p80", p99=10.0),
        _step("ours", 250, 250, kind="half", p99=12.0),
        _step("kamailio", 500, 500, kind="half", p99=9.0),
        _step("ours", 750, 750, kind="overload", failed=0),
    ]
    mem = [
        MemoryResult("ours", True, 1000, 1000, idle_kb=50_000, loaded_kb=55_000),
        MemoryResult("kamailio", True, 1000, 1000, idle_kb=60_000, loaded_kb=62_500),
    ]
    results = {"steps": [s.to_json() for s in ours + kam + half], "memory": [m.to_json() for m in mem]}
    s = report.summary(results)["pinned"]
    assert s["ours_zero_failure_cps"] == 499
    assert s["kamailio_zero_failure_cps"] == 1000
    assert abs(s["cps_ratio"] - 0.499) < 1e-9
    assert s["ours_cpu_s_per_1k"] == 1.2  # median of the clean steps >= 250 cps (nearest rank)
    assert abs(s["cpu_ratio"] - 1.2 / 0.7) < 1e-9
    assert s["ours_half_p99_ms"] == 12.0 and s["ours_half_rate"] == 250
    m = report.summary(results)["memory"]
    assert m["ours"] == 5000 * 1024 / 1000 and abs(m["ratio"] - 2.0) < 1e-9
    md = report.render_markdown({**results, "machine": {"nproc": 2}, "command": "python -m bench"})
    assert "| zero-failure cps | 499 | 1000 | 0.50 | ≥ 1.00 | **not met** |" in md
    # issue 16: CPU per call compared at one offered rate, p99 at 80 %, carried under overload
    assert s["cpu_ratio_at_500"] == 1.4 / 0.7 and s["cpu_ratio_at_1000"] is None
    assert "| CPU s per 1,000 calls at 500 cps offered | 1.40 | 0.70 | 2.00 | ≤ 1.20 | **not met** |" in md
    assert s["ours_p80_p99_ms"] == 25.0 and s["ours_p80_rate"] == 400
    assert "(ours 400 cps, Kamailio 800 cps) | 25 | 10 | 2.50x | < 20 ms | **not met** |" in md
    carried = s["ours_overload_carried_min"]
    assert carried == _step("ours", 750, 750, kind="overload").completed_cps / 499
    assert "| memory per concurrent ringing call | 5.0 KB | 2.5 KB | 2.00 | < 10 KB | met |" in md
    assert "750 | 600 | 7500 | 0 ✗" in md


def test_memory_without_calls_has_no_figure() -> None:
    assert MemoryResult("ours", True, 100).per_call_bytes is None


def test_readme_splice_keeps_the_prose() -> None:
    text = "# Bench\n\nprose\n"
    once = report.splice_readme(text, "table 1\n")
    assert once.startswith("# Bench\n\nprose\n") and "table 1" in once
    twice = report.splice_readme(once + "\nmore prose after\n", "table 2\n")
    assert "table 1" not in twice and "table 2" in twice and twice.endswith("more prose after\n")
    assert twice.count(report.BEGIN) == 1


def test_folded_profile() -> None:
    folded = (
        "process 1:python;main (proxy_runtime/__main__.py:10);receive (/x/proxy_runtime/core/proxy.py:5);"
        "parse (/x/proxy_runtime/sip/message.py:7) 30\n"
        "process 1:python;main (proxy_runtime/__main__.py:10);receive (/x/proxy_runtime/core/proxy.py:6) 10\n"
        "garbage\n"
    )
    self_c, incl, total = parse_folded(folded)
    assert total == 40
    assert self_c["parse (proxy_runtime/sip/message.py)"] == 30
    assert incl["receive (proxy_runtime/core/proxy.py)"] == 40  # two lines of one function merged


def test_identity_and_injection_file(tmp_path: object) -> None:
    assert 850 <= len(IDENTITY) <= 950
    assert IDENTITY.endswith(";alg=ES256;ppt=shaken") and IDENTITY.count(".") >= 2
    assert len(make_identity(1200)) >= 1150
    from pathlib import Path

    p = write_inf(Path(str(tmp_path)) / "mix.csv", True)
    lines = p.read_text().splitlines()
    assert lines[0] == "SEQUENTIAL"
    assert sum(1 for ln in lines[1:] if ln.startswith("503;")) == 3 and len(lines) == 11


def test_refused_calls_are_not_clean_and_the_overload_table_pairs_each_run_with_the_calm_one() -> None:
    base = {"target": "ours", "pinned": True, "seconds": 10.0, "calls": 10000, "achieved_cps": 1000.0}
    # SIPp counts a 503 end as a successful call: 10,000 ok but the carriers completed 7,000.
    refusing = StepResult(kind="step", rate=1000, ok=10000, carried=7000, **base)  # type: ignore[arg-type]
    assert refusing.refused == 3000 and not refusing.clean
    assert StepResult(kind="step", rate=1000, ok=10000, carried=10000, **base).clean  # type: ignore[arg-type]
    assert StepResult(kind="mix", rate=1000, ok=10000, carried=7000, **base).clean  # type: ignore[arg-type]
    assert StepResult(kind="step", rate=1000, ok=10000, **base).clean  # type: ignore[arg-type]  # older JSON
    over = StepResult(kind="overload", rate=1500, ok=15000, carried=9500, **base)  # type: ignore[arg-type]
    after = StepResult(kind="after", rate=500, ok=2500, carried=2500, p99_ms=12.0, **base)  # type: ignore[arg-type]
    rows = report.overload_table([over, after])
    assert len(rows) == 3
    assert "| ours | 1500 | 950 | 5500 | 0 |" in rows[2] and rows[2].endswith("| 0, 12 |")
