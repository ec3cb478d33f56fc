"""The real CDK CLI (offline synth), cfn-lint and cdk-nag over the synthesized stack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest

import app as cdk_app

from .conftest import REPO, cdk_cli, cli_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cdk-out")
    proc = subprocess.run(
        [
            cdk_cli(),
            "synth",
            "--quiet",
            "--output",
            str(out),
            "-c",
            "sip_cidrs=203.0.113.10/32,198.51.100.0/28",
            "-c",
            "alarm_email=noc@example.net",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_cdk_synth_offline(cli_synth: Path) -> None:
    template = json.loads((cli_synth / "ClearIpProxy.template.json").read_text())
    assert sum(r["Type"] == "AWS::EC2::Instance" for r in template["Resources"].values()) == 2
    manifest = json.loads((cli_synth / "manifest.json").read_text())
    stack = manifest["artifacts"]["ClearIpProxy"]
    assert stack["environment"] == "aws://unknown-account/unknown-region"  # env-agnostic: no lookups


def test_cdk_synth_refuses_bad_settings(tmp_path: Path) -> None:
    proc = subprocess.run(
        [cdk_cli(), "synth", "--quiet", "--output", str(tmp_path), "-c", "sip_cidrs=0.0.0.0/0"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "sip_cidrs" in proc.stderr and "whole internet" in proc.stderr


def test_cfn_lint_reports_no_error(cli_synth: Path) -> None:
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "cfn-lint"),
            "--format",
            "json",
            "--regions",
            "us-east-1",
            "eu-west-1",
            "--",
            str(cli_synth / "ClearIpProxy.template.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    findings: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    errors = [f for f in findings if f["Level"] == "Error"]
    assert errors == [], json.dumps(errors, indent=1)[:4000]


def test_cdk_nag_has_no_unacknowledged_findings(tmp_path: Path) -> None:
    app = cdk_app.build_app(
        {
            "sip_cidrs": "203.0.113.10/32",
            "ssh_cidr": "192.0.2.0/29",
            "alarm_email": "noc@example.net",
            "key_pair": "k",
        }
    )
    assert isinstance(app, cdk.App)
    app.synth()  # raises ValidationFailed when a finding is not acknowledged
    report_file = Path(app.outdir) / "validation-report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        failures = [r for p in report.get("pluginReports", []) for r in p.get("violations", [])]
        assert failures == []


def test_every_acknowledgment_has_a_reason() -> None:
    app = cdk_app.build_app({"sip_cidrs": "203.0.113.10/32"})
    ours: dict[str, str] = {}
    for c in app.node.find_all():
        for m in c.node.metadata:
            if m.type == "aws:cdk:acknowledged-rules":
                ours.update({k: v for k, v in m.data.items() if k.startswith("AwsSolutions::")})
    assert set(ours) == {
        "AwsSolutions::AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
        "AwsSolutions::AwsSolutions-IAM5[Resource::*]",
        "AwsSolutions::AwsSolutions-IAM5[Resource::<OperationsTraceBucketAE416723.Arn>/traces/*]",
        "AwsSolutions::AwsSolutions-S1",
    }
    for rule, reason in ours.items():
        assert len(reason.split()) >= 12, (rule, reason)
