"""A real CloudWatch-speaking HTTP endpoint for tests: moto in server mode on 127.0.0.1.

moto's ``mock_aws`` does not intercept aiobotocore, so tests talk HTTP to a ThreadedMotoServer.
Reusable from other test packages: ``from tests.metrics.moto_fixtures import moto_server, aws_env``
in a conftest.py (pytest fixtures), or :func:`start_moto` / :func:`metric_statistics` directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from proxy_runtime.metrics.names import DIMENSION_PROXY_ID, NAMESPACE

REGION = "us-east-1"


@dataclass(frozen=True)
class MotoEndpoint:
    server: Any
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a process (the proxy) that should publish to this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        return boto3.client(
            "cloudwatch",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int = 0) -> MotoEndpoint:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    return MotoEndpoint(server, host, int(bound))


def metric_statistics(
    client: Any, name: str, proxy_id: str, *, minutes: int = 30, namespace: str = NAMESPACE
) -> dict[str, float]:
    """Sum, SampleCount, Minimum, Maximum of ``name`` for ``proxy_id`` over the last ``minutes``
    (all datapoints folded into one: a test's data may straddle a minute boundary)."""
    now = dt.datetime.now(dt.UTC)
    resp = client.get_metric_statistics(
        Namespace=namespace,
        MetricName=name,
        Dimensions=[{"Name": DIMENSION_PROXY_ID, "Value": proxy_id}],
        StartTime=now - dt.timedelta(minutes=minutes),
        EndTime=now + dt.timedelta(minutes=5),
        Period=60,
        Statistics=["Sum", "SampleCount", "Minimum", "Maximum"],
    )
    points = resp["Datapoints"]
    if not points:
        return {"Sum": 0.0, "SampleCount": 0.0}
    return {
        "Sum": sum(p["Sum"] for p in points),
        "SampleCount": sum(p["SampleCount"] for p in points),
        "Minimum": min(p["Minimum"] for p in points),
        "Maximum": max(p["Maximum"] for p in points),
    }


@pytest.fixture
def moto_server() -> Iterator[MotoEndpoint]:
    endpoint = start_moto()
    try:
        yield endpoint
    finally:
        with contextlib.suppress(Exception):
            endpoint.server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake credentials and region, no instance metadata, no profile files, no endpoint override."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_CLOUDWATCH"):
        monkeypatch.delenv(var, raising=False)
    yield
