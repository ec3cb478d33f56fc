"""Phone-number masking shared by the per-call log line (metrics) and SIP traces (operations/trace).

One rule, one place: the trace (a layer above) imports it from here.
"""

from __future__ import annotations


def mask_digits(text: str) -> str:
    """Mask the digits of a phone number, keeping the last four (the last two when it is short).

    Numbers of four digits or fewer (911, 933, service codes) are left as they are.
    """
    n = sum(c.isdigit() for c in text)
    if n <= 4:
        return text
    keep = 4 if n >= 10 else 2
    out = []
    seen = 0
    for c in text:
        if c.isdigit():
            seen += 1
            out.append(c if seen > n - keep else "x")
        else:
            out.append(c)
    return "".join(out)
