"""``clearip-proxy trace``: ask the running proxy, over its control socket, to write a SIP trace for
N seconds, wait, and report the files written (``--stop`` and ``--status`` act on a running trace).

A short-lived client of :mod:`proxy_runtime.operations.control`; the tracing itself is
:mod:`proxy_runtime.operations.trace`, inside the proxy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy_runtime.operations import control


def trace_main(argv: Sequence[str], sleep: Callable[[float], None] = time.sleep) -> int:
    p = argparse.ArgumentParser(
        prog="clearip-proxy trace", description="capture a SIP trace (decrypted) from the running proxy"
    )
    p.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="trace file (the proxy writes it; its directory must be writable by the proxy)",
    )
    p.add_argument(
        "--format", choices=("text", "pcap"), default=None, help="default: pcap for *.pcap, else text"
    )
    p.add_argument("--max-bytes", type=int, default=None, help="per file (default 10 MiB)")
    p.add_argument("--max-files", type=int, default=None, help="files kept (default 5)")
    p.add_argument("--control-socket", metavar="PATH", help="the running proxy's control socket")
    p.add_argument("--stop", action="store_true", help="stop the running trace and exit")
    p.add_argument("--status", action="store_true", help="show the trace status and exit")
    args = p.parse_args(list(argv))
    sock = control.find_control_socket(args.control_socket)
    if sock is None:
        print(
            "clearip-proxy trace: no control socket found; is the proxy running? (--control-socket PATH)",
            file=sys.stderr,
        )
        return 2

    def ask(payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        answer = control.request(sock, payload, timeout=timeout)
        if not answer.get("ok"):
            raise RuntimeError(str(answer.get("error")))
        return answer

    try:
        if args.stop or args.status:
            ans = ask({"cmd": "trace-stop" if args.stop else "trace-status"})
            print(json.dumps(ans["trace"], indent=2))
            return 0
        if not args.output:
            p.error("--output FILE is required")
        if not 0 < args.seconds <= 24 * 3600:
            p.error("--seconds must be in (0, 86400]")
        output = str(Path(args.output).expanduser().resolve())
        fmt = args.format or ("pcap" if output.endswith((".pcap", ".cap")) else "text")
        req: dict[str, Any] = {"cmd": "trace-start", "output": output, "seconds": args.seconds, "format": fmt}
        if args.max_bytes:
            req["max_bytes"] = args.max_bytes
        if args.max_files:
            req["max_files"] = args.max_files
        started = ask(req)["trace"]
        print(
            f"tracing to {started['output']} ({fmt}) for {args.seconds:g} s ...", file=sys.stderr, flush=True
        )
        deadline = time.monotonic() + args.seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                sleep(min(1.0, left))
                st = ask({"cmd": "trace-status"})["trace"]
                if not st.get("active") or st.get("output") != output:
                    break  # stopped early (write error, or stopped by someone else)
        except KeyboardInterrupt:
            pass
        final = ask({"cmd": "trace-stop"})["trace"]
    except (OSError, ValueError) as exc:
        print(f"clearip-proxy trace: cannot talk to the proxy at {sock}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"clearip-proxy trace: {exc}", file=sys.stderr)
        return 1
    files = final.get("files") or []
    print(
        f"trace {final.get('stop_reason') or 'done'}: {final.get('messages', 0)} message(s), "
        f"{final.get('bytes', 0)} bytes; files: {', '.join(files) or 'none'}"
        + ("" if final.get("numbers_masked") is False else "; phone numbers masked")
    )
    if final.get("error"):
        print(f"clearip-proxy trace: {final['error']}", file=sys.stderr)
        return 1
    return 0 if files and Path(files[0]).exists() else 1
