"""Where closed intervals go. A sink encodes (pure) and sends (I/O); the publisher owns retries.

* :class:`CloudWatchSink` — PutMetricData through aiobotocore; region and credentials the standard
  AWS way, the endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_CLOUDWATCH``) when set.
* :class:`LogSink` — the same figures as one JSON line an interval on logger ``clearip.metrics``
  (``"event":"metrics"``); straight to stdout when logging is not configured.
* :class:`NullSink` — nothing.

:func:`make_sink` picks one from the ``metrics`` setting (``auto`` = cloudwatch when botocore finds
credentials and a region, else log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from proxy_runtime.metrics.names import DIMENSION_PROXY_ID, NAMESPACE
from proxy_runtime.metrics.records import Interval
from proxy_runtime.metrics.serialize import build_requests, interval_record

METRICS_LOGGER = "clearip.metrics"
"""Logger of the ``log`` sink's line (one an interval, at INFO)."""

log = logging.getLogger(__name__)

_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalFailure",
    }
)


class Sink:
    """Base sink: ``encode`` turns an interval into payloads (pure), ``send`` delivers one payload."""

    kind = "off"

    async def open(self) -> None:
        """Acquire what sending needs (an HTTP client). Called once by the publisher's start()."""

    async def close(self) -> None:
        """Release it. Called once by the publisher's stop()."""

    def encode(self, interval: Interval) -> list[Any]:
        raise NotImplementedError

    async def send(self, payload: Any) -> None:
        raise NotImplementedError

    def retryable(self, exc: BaseException) -> bool:
        """Whether sending again may succeed (throttling, 5xx, network); False drops the interval now."""
        return True


class NullSink(Sink):
    """``--metrics off``: nothing is encoded, nothing sent."""

    kind = "off"

    def encode(self, interval: Interval) -> list[Any]:
        return []

    async def send(self, payload: Any) -> None:  # pragma: no cover - encode yields nothing
        return None


class LogSink(Sink):
    """One JSON line an interval on logger ``clearip.metrics`` (stdout when no handler is configured)."""

    kind = "log"

    def __init__(self, *, namespace: str = NAMESPACE, dimensions: Mapping[str, str]) -> None:
        self.namespace = namespace
        self.dimensions = dict(dimensions)
        self._logger = logging.getLogger(METRICS_LOGGER)

    def encode(self, interval: Interval) -> list[Any]:
        return [json.dumps(interval_record(interval, self.namespace, self.dimensions), separators=(",", ":"))]

    async def send(self, payload: Any) -> None:
        if self._logger.hasHandlers():
            self._logger.info(payload)
        else:
            print(payload, file=sys.stdout, flush=True)


class CloudWatchSink(Sink):
    """PutMetricData through aiobotocore; one client for the sink's life, no botocore retries."""

    kind = "cloudwatch"

    def __init__(
        self,
        *,
        namespace: str = NAMESPACE,
        dimensions: Mapping[str, str],
        region: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        session: Any = None,
    ) -> None:
        self.namespace = namespace
        self.dimensions = dict(dimensions)
        self.region = region
        self.endpoint_url = endpoint_url
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session = session
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        session = self._session or AioSession()
        config = AioConfig(
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            retries={"mode": "standard", "total_max_attempts": 1},  # the publisher retries
        )
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.create_client(
                "cloudwatch", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        )
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def encode(self, interval: Interval) -> list[Any]:
        return build_requests(interval, self.namespace, self.dimensions)

    async def send(self, payload: Any) -> None:
        if self._client is None:
            raise RuntimeError("CloudWatchSink.send before open()")
        await self._client.put_metric_data(**payload)

    def retryable(self, exc: BaseException) -> bool:
        response = getattr(exc, "response", None)
        if not isinstance(response, dict):
            return True  # connection refused, timeout, DNS: the endpoint may come back
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _THROTTLING_CODES or status >= 500 or status in (0, 408, 429)


def _resolve_region(region: str | None) -> str | None:
    """The region the standard AWS way (env, config file), then the EC2 instance metadata."""
    if region:
        return region
    import botocore.session
    from botocore.utils import IMDSRegionProvider

    session = botocore.session.get_session()
    found = session.get_config_variable("region")
    if found:
        return str(found)
    try:
        return IMDSRegionProvider(session).provide() or None
    except Exception:  # pragma: no cover - depends on the host
        return None


def _have_credentials() -> bool:
    import botocore.session

    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # a broken profile is "no credentials" for auto
        return False


def make_sink(
    kind: str,
    *,
    proxy_id: str,
    namespace: str = NAMESPACE,
    region: str | None = None,
    endpoint_url: str | None = None,
) -> Sink:
    """The sink for the ``metrics`` setting: ``cloudwatch`` | ``log`` | ``off`` | ``auto``.

    Blocking (it may ask the EC2 instance metadata for credentials and region): call it at start-up.
    ``cloudwatch`` without a region raises ValueError; ``auto`` falls back to ``log`` then.
    """
    dimensions = {DIMENSION_PROXY_ID: proxy_id}
    if kind == "off":
        return NullSink()
    if kind == "log":
        return LogSink(namespace=namespace, dimensions=dimensions)
    if kind not in ("cloudwatch", "auto"):
        raise ValueError(f"unknown metrics sink {kind!r}")
    if kind == "auto" and not _have_credentials():
        log.info("metrics: no AWS credentials found, writing metrics to the log")
        return LogSink(namespace=namespace, dimensions=dimensions)
    resolved = _resolve_region(region)
    if resolved is None:
        if kind == "auto":
            log.warning("metrics: AWS credentials but no region (set AWS_REGION); writing metrics to the log")
            return LogSink(namespace=namespace, dimensions=dimensions)
        raise ValueError("metrics = cloudwatch needs an AWS region (AWS_REGION or the EC2 metadata)")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return CloudWatchSink(namespace=namespace, dimensions=dimensions, region=resolved, endpoint_url=endpoint)
