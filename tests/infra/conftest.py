"""Shared fixtures: synthesized templates are expensive (~6 s for the first), so build each once."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from infra.settings import DeploymentSettings
from infra.stack import ClearIpProxyStack
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
CDK = REPO / "node_modules" / ".bin" / "cdk"

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "1")

AMI = "ami-03cf127a"  # one of moto's built-in images, so the moto deploy can run it too
DEFAULT_CONTEXT: dict[str, Any] = {
    "sip_cidrs": "203.0.113.10/32,198.51.100.0/28",
    "ami": AMI,
    "alarm_email": "",
}
ADOPTED = ("eipalloc-0a1b2c3d4e5f60718", "198.51.100.7")
FULL_CONTEXT: dict[str, Any] = {
    "ami": "ami-0123456789abcdef0",
    "eip_allocations": [{"allocation_id": ADOPTED[0], "address": ADOPTED[1]}],
    "proxy": {"ring_timeout": 90, "copy_headers": ["Identity"]},
    "sip_cidrs": ["203.0.113.10/32", "198.51.100.0/28", "2001:db8::/48"],
    "ssh_cidr": "192.0.2.0/29",
    "alarm_email": "noc@example.net",
    "key_pair": "noc-key",
    "proxy_count": "3",
    "instance_type": "c6i.large",
    "clearip_transport": "tcp",
    "timeout": "3",
    "stack_name": "SiteB",
    "alarm_clearip_timeouts": 25,
}


def cdk_cli() -> str:
    """The CDK CLI pinned in package.json (skipped without it; an error under CI=true)."""
    return require_tool("cdk", "the CDK CLI pinned in package.json (npm install)", path=CDK)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for every CDK CLI call: no telemetry, no Node EOL banner, no real credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        CDK_DISABLE_CLI_TELEMETRY="1",
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
        PATH=f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def synth_stack(context: Mapping[str, Any]) -> ClearIpProxyStack:
    app = cdk.App(context=dict(context))
    settings = DeploymentSettings.from_mapping(dict(context))
    return ClearIpProxyStack(app, settings.stack_name, settings=settings)


@pytest.fixture(scope="session")
def default_stack() -> ClearIpProxyStack:
    return synth_stack(DEFAULT_CONTEXT)


@pytest.fixture(scope="session")
def template(default_stack: ClearIpProxyStack) -> Template:
    return Template.from_stack(default_stack)


@pytest.fixture(scope="session")
def full_stack() -> ClearIpProxyStack:
    return synth_stack(FULL_CONTEXT)


@pytest.fixture(scope="session")
def full_template(full_stack: ClearIpProxyStack) -> Template:
    return Template.from_stack(full_stack)


@pytest.fixture(scope="session")
def template_json(template: Template) -> dict[str, Any]:
    return dict(template.to_json())


@pytest.fixture(scope="session")
def template_file(template_json: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("template") / "ClearIpProxy.template.json"
    path.write_text(json.dumps(template_json, indent=1))
    yield path


def resources(tpl: Mapping[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in tpl["Resources"].items() if v["Type"] == rtype}


def flatten(value: Any, refs: Mapping[str, str] | None = None) -> str:
    """Render an Fn::Join/Fn::Sub/Ref tree as a string, with ``refs`` standing in for references."""
    refs = refs or {}
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Fn::Base64" in value:
            return flatten(value["Fn::Base64"], refs)
        if "Fn::Join" in value:
            sep, parts = value["Fn::Join"]
            return str(sep).join(flatten(p, refs) for p in parts)
        if "Ref" in value:
            return refs.get(value["Ref"], f"REF-{value['Ref']}")
        if "Fn::GetAtt" in value:
            key = ".".join(value["Fn::GetAtt"])
            return refs.get(key, f"ATT-{key}")
        if "Fn::Sub" in value:
            s = value["Fn::Sub"]
            for k, v in refs.items():
                s = s.replace("${" + k + "}", v)
            return str(s)
    raise AssertionError(f"cannot flatten {value!r}")
