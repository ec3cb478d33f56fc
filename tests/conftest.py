"""Session-wide test settings."""

from __future__ import annotations

import os

# Proxies started by tests run without the default control socket (/run or /tmp), so a doctor or
# trace test can never reach a proxy some other test (or a benchmark) started. Tests that need a
# control socket pass an explicit --control-socket PATH.
os.environ.setdefault("CLEARIP_CONTROL_SOCKET", "off")
# Never let botocore probe the EC2 instance metadata address from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
