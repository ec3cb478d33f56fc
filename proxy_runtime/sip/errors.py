"""The error every SIP parsing step raises: what was wrong and the status a server should answer.

Like h11's ``error_status_hint``: the proxy answers a request that fails to parse with
``status_hint`` (400, 416, 505, 513) and keeps serving.
"""

from __future__ import annotations


class ParseError(ValueError):
    """A message that cannot be understood. ``status_hint``: what to answer a request (400, 505...)."""

    def __init__(self, reason: str, status_hint: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint
