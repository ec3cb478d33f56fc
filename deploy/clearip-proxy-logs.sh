#!/usr/bin/env bash
# Export the proxy's journal to two files that the CloudWatch agent ships to CloudWatch Logs:
#   /var/log/clearip-proxy/calls.log  the per-call lines, as bare JSON (Logs Insights reads the
#                                     fields without a parse step), one a finished call;
#   /var/log/clearip-proxy/proxy.log  every other line of the proxy's output.
# Why a file: the CloudWatch agent reads files (its configuration has no journald input), and the
# journal stays the proxy's one log on the host (journalctl -u clearip-proxy still shows all).
# journalctl's --cursor-file keeps the position across restarts of this exporter, so a restart
# neither loses nor repeats lines (at most the lines in flight at a crash). logrotate rotates the
# files (deploy/clearip-proxy.logrotate, copytruncate: awk appends, O_APPEND follows the truncate).
#
# Usage: clearip-proxy-logs.sh                 follow the journal (the systemd unit runs this)
#        clearip-proxy-logs.sh --split DIR     split lines from stdin into DIR (tests, replays)
set -euo pipefail

UNIT=clearip-proxy.service
LOG_DIR=/var/log/clearip-proxy
STATE_DIR="${STATE_DIRECTORY:-/var/lib/clearip-proxy-logs}"

# A call line, as the proxy's logging writes it: "<time> INFO clearip.calls: {...}".
split() {
  local dir="$1"
  awk -v calls="$dir/calls.log" -v proxy="$dir/proxy.log" '
    {
      i = index($0, " clearip.calls: {")
      if (i > 0) { print substr($0, i + 16) >> calls; fflush(calls) }
      else { print >> proxy; fflush(proxy) }
    }'
}

if [ "${1:-}" = --split ]; then
  [ $# -eq 2 ] || { echo "usage: $0 --split DIR" >&2; exit 2; }
  split "$2"
  exit 0
fi

mkdir -p "$STATE_DIR"
journalctl --unit="$UNIT" --output=cat --follow --cursor-file="$STATE_DIR/cursor" | split "$LOG_DIR"
