"""The proxy's logging set-up: the line format the log exporter splits on, and no per-record
collection of fields the format never prints (every finished call logs a line)."""

from __future__ import annotations

from tests.child import run_json

# Run in a child: the set-up changes process-wide logging state that pytest's own capture uses.
_CHILD = """
import io, json, logging
from proxy_runtime.__main__ import setup_logging
out = io.StringIO()
setup_logging("info", out)
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append({"func": record.funcName, "thread": record.thread, "process": record.process})
logging.getLogger().addHandler(Keep())
logging.getLogger("clearip.calls").info('{"event":"call"}')
logging.getLogger("clearip.calls").debug("not at info")
print(json.dumps({"out": out.getvalue(), "seen": seen}))
"""


def test_call_lines_keep_their_format_without_caller_thread_or_process_fields() -> None:
    got = run_json(_CHILD, timeout=60)
    # "<date> <time>,<ms> INFO clearip.calls: {...}": what deploy/clearip-proxy-logs.sh splits on.
    line = got["out"]
    assert line.endswith(' INFO clearip.calls: {"event":"call"}\n'), line
    assert line.count("\n") == 1
    # Not collected: the frame walk for the caller, the thread and the process of each record.
    assert got["seen"] == [{"func": "(unknown function)", "thread": None, "process": None}]
