"""Memory soak: many calls through the proxy; RSS must settle (issue 7, fault 8).

Runs the proxy (``python -m proxy_runtime run``) on loopback with SIPp as switch (UDP), ClearIP
(TCP, 302 with realistic Identity headers) and carrier (UDP, answers, caller hangs up), in batches
of ``--batch`` calls. The proxy's RSS is read from /proc after every batch; the check is
``RSS(end) <= RSS(after the first 10 %) * 1.10`` (a leak of transactions, dialogs or connections
grows RSS linearly with calls). No message traces are written, so the run's own disk use is flat.

    python -m bench.soak --calls 100000            # the full run (a few minutes)
    python -m bench.soak --calls 2000 --batch 200  # what the test suite runs
    CLEARIP_COMPILED_DIR=.build/compiled python -m bench.soak ...  # the compiled core (make compiled)

Exit status 0 when the RSS check passes and every batch's SIPp exited 0 (or failed calls stayed
under ``--max-failed-ratio``), 1 otherwise. Prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.flows import CLEARIP_KEYS  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    CALLER_IDENTITY,
    HOST,
    PROXY_MODULE,
    SCENARIOS,
    SIPP,
    free_port,
    proxy_pythonpath,
    wait_established,
    wait_listening,
)


@dataclass
class SoakResult:
    calls: int
    batch: int
    rate: int
    rss_kb: list[int] = field(default_factory=list)  # after each batch
    calls_done: list[int] = field(default_factory=list)
    failed_calls: int = 0
    seconds: float = 0.0
    rss_start_kb: int = 0
    reference_kb: int = 0  # after the first 10 % of calls
    end_kb: int = 0
    growth: float = 0.0  # end / reference - 1
    ok: bool = False


def rss_kb(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _failed_calls(stat_out: str) -> int:
    m = re.findall(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", stat_out)
    return int(m[-1]) if m else 0


def run(
    calls: int, batch: int, rate: int, workdir: Path, max_failed_ratio: float = 0.001, pause: float = 0.0
) -> SoakResult:
    """``pause``: seconds of silence before each batch after the first (transactions drain)."""
    res = SoakResult(calls, batch, rate)
    procs: list[subprocess.Popen[bytes]] = []
    # CLEARIP_COMPILED_DIR=.build/compiled (after `make compiled`): the compiled core
    env = dict(os.environ, PYTHONPATH=proxy_pythonpath(), PYTHONDONTWRITEBYTECODE="1")
    devnull = subprocess.DEVNULL
    try:
        carrier_port, clearip_port, proxy_port = free_port(), free_port(), free_port()
        base = [SIPP, "-i", HOST, "-nostdin", "-max_retrans", "7"]
        carrier = subprocess.Popen(
            [*base, "-sf", str(SCENARIOS / "carrier_answer.xml"), "-p", str(carrier_port), "-t", "u1"],
            stdout=devnull, stderr=devnull, stdin=devnull, cwd=workdir,
        )  # fmt: skip
        procs.append(carrier)
        keys = dict(CLEARIP_KEYS, contacts=f"<sip:+15555550100@{HOST}:{carrier_port}>;q=0.9")
        key_args = [a for k, v in keys.items() for a in ("-key", k, v)]
        clearip = subprocess.Popen(
            [*base, "-sf", str(SCENARIOS / "clearip_302.xml"), "-p", str(clearip_port), "-t", "t1",
             *key_args],
            stdout=devnull, stderr=devnull, stdin=devnull, cwd=workdir,
        )  # fmt: skip
        procs.append(clearip)
        wait_listening(carrier_port, "udp")
        wait_listening(clearip_port, "tcp")
        log = (workdir / "proxy.log").open("wb")
        proxy = subprocess.Popen(
            [
                *PROXY_MODULE, "run",
                "--udp", f"{HOST}:{proxy_port}",
                "--clearip", f"sip:{HOST}:{clearip_port};transport=tcp",
                "--timeout", "2", "--allow", "127.0.0.0/8", "--metrics", "off", "--log-level", "WARNING",
                "--max-in-flight", "5000",
                # The soak measures memory per carried call. On a starved shared machine overload
                # control would (rightly) refuse calls and the run would measure refusals instead.
                "--overload-queue-delay", "0",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=devnull, cwd=REPO, env=env,
        )  # fmt: skip
        log.close()
        procs.append(proxy)
        wait_listening(proxy_port, "udp", 10)
        if not wait_established(clearip_port, 10):
            raise RuntimeError("the proxy did not connect to the ClearIP SIPp")
        time.sleep(0.3)
        res.rss_start_kb = rss_kb(proxy.pid)
        t0 = time.monotonic()
        done = 0
        uac_keys = {
            "ruri_user": "+15555550100",
            "ruri_host": f"{HOST}:{proxy_port}",
            "max_forwards": "70",
            "caller_identity": CALLER_IDENTITY,
        }
        uac_key_args = [a for k, v in uac_keys.items() for a in ("-key", k, v)]
        while done < calls:
            if done and pause:
                time.sleep(pause)
            n = min(batch, calls - done)
            try:
                out = subprocess.run(
                    [
                        *base, f"{HOST}:{proxy_port}", "-sf", str(SCENARIOS / "uac_call.xml"),
                        "-p", str(free_port()), "-t", "u1", "-m", str(n), "-r", str(rate),
                        "-l", str(rate * 2),
                        "-timeout", f"{n / rate + 60:.0f}s", *uac_key_args,
                    ],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=devnull, cwd=workdir,
                    timeout=n / rate + 90, check=False,
                )  # fmt: skip
                res.failed_calls += _failed_calls(out.stdout.decode("utf-8", "replace"))
            except subprocess.TimeoutExpired:  # a stuck SIPp (e.g. a starved machine): count the batch
                res.failed_calls += n
            done += n
            if proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited with {proxy.returncode}")
            res.rss_kb.append(rss_kb(proxy.pid))
            res.calls_done.append(done)
            print(
                f"{done:>8} calls  RSS {res.rss_kb[-1] / 1024:.1f} MiB  failed {res.failed_calls}",
                file=sys.stderr,
            )
        res.seconds = time.monotonic() - t0
        ref_index = next(i for i, d in enumerate(res.calls_done) if d >= calls // 10)
        res.reference_kb = res.rss_kb[ref_index]
        res.end_kb = res.rss_kb[-1]
        res.growth = res.end_kb / res.reference_kb - 1
        res.ok = res.growth <= 0.10 and res.failed_calls <= max(1, int(calls * max_failed_ratio))
        return res
    finally:
        for p in reversed(procs):
            _stop(p, signal.SIGUSR1 if p is not procs[-1] or len(procs) < 3 else signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=0, help="calls per SIPp run (default: calls / 10)")
    ap.add_argument("--rate", type=int, default=300, help="calls per second")
    args = ap.parse_args(argv)
    batch = args.batch or max(1, args.calls // 10)
    with tempfile.TemporaryDirectory(prefix="soak-") as d:
        res = run(args.calls, batch, args.rate, Path(d))
    print(json.dumps(asdict(res)))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
