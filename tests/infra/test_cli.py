"""The real CDK CLI (offline synth), cfn-lint and cdk-nag over the synthesized stack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import aws_cdk.aws_s3 as s3
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
            "-c",
            "ami=ami-0123456789abcdef0",
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
        [
            cdk_cli(),
            "synth",
            "--quiet",
            "--output",
            str(tmp_path),
            "-c",
            "sip_cidrs=0.0.0.0/0",
            "-c",
            "ami=ami-0123456789abcdef0",
            "-c",
            "alarm_email=noc@example.net",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "sip_cidrs" in proc.stderr and "whole internet" in proc.stderr


def cfn_lint(template: Path) -> tuple[int, list[dict[str, Any]]]:
    """cfn-lint's exit code and its findings. Its exit code is a bit mask (2 error, 4 warning,
    8 informational); 1, or output that is not a JSON list, means cfn-lint itself failed, which
    must never read as "no findings"."""
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "cfn-lint"),
            "--format",
            "json",
            "--regions",
            "us-east-1",
            "eu-west-1",
            "--",
            str(template),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode in (0, 2, 4, 6, 8, 10, 12, 14), (
        f"cfn-lint failed ({proc.returncode}): {proc.stderr}"
    )
    findings = json.loads(proc.stdout)  # empty output is a failure too, not "[]"
    assert isinstance(findings, list), proc.stdout[:1000]
    assert bool(findings) == (proc.returncode != 0), (proc.returncode, proc.stdout[:1000])
    return proc.returncode, findings


def test_cfn_lint_reports_no_error(cli_synth: Path) -> None:
    code, findings = cfn_lint(cli_synth / "ClearIpProxy.template.json")
    errors = [f for f in findings if f["Level"] == "Error"]
    assert errors == [], json.dumps(errors, indent=1)[:4000]
    assert not code & 2, code


def test_cfn_lint_finds_an_error_it_is_shown(tmp_path: Path, cli_synth: Path) -> None:
    """The check above can fail: the same template with one bad property is an error (exit bit 2)."""
    template = json.loads((cli_synth / "ClearIpProxy.template.json").read_text())
    instance = next(r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::Instance")
    instance["Properties"]["InstanceType"] = 42
    instance["Properties"]["NoSuchProperty"] = "x"
    broken = tmp_path / "broken.template.json"
    broken.write_text(json.dumps(template))
    code, findings = cfn_lint(broken)
    assert code & 2, code
    assert any(f["Level"] == "Error" and "NoSuchProperty" in f["Message"] for f in findings), findings[:3]


NAG_CONTEXT = {
    "sip_cidrs": "203.0.113.10/32",
    "ssh_cidr": "192.0.2.0/29",
    "alarm_email": "noc@example.net",
    "key_pair": "k",
    "ami": "ami-0123456789abcdef0",
    "eip_allocations": "eipalloc-0a1b2c3d4e5f60718=198.51.100.7",
}


def test_cdk_nag_has_no_unacknowledged_findings() -> None:
    app = cdk_app.build_app(dict(NAG_CONTEXT))
    assert isinstance(app, cdk.App)
    app.synth()  # raises when a finding is not acknowledged
    report = json.loads((Path(app.outdir) / "validation-report.json").read_text())
    plugins = {r["pluginName"]: r for r in report["pluginReports"]}
    nag = plugins["AwsSolutions"]  # the report must exist and hold cdk-nag's AwsSolutions pack
    for name, plugin in plugins.items():  # every validation plugin passed
        assert (plugin["conclusion"], plugin["violations"]) == ("success", []), name
    suppressed = {v["acknowledgedId"] for v in nag["suppressedViolations"]}
    assert suppressed and all(s.startswith("AwsSolutions::") for s in suppressed), suppressed


def test_cdk_nag_fails_synth_on_an_unacknowledged_finding() -> None:
    """The check above can fail: a bucket without SSL enforcement (AwsSolutions-S10) stops synth."""
    app = cdk_app.build_app(dict(NAG_CONTEXT))
    s3.Bucket(cdk.Stack(app, "Unacknowledged"), "Plain")
    with pytest.raises(Exception, match="AwsSolutions-S10"):
        app.synth()


def test_every_acknowledgment_has_a_reason() -> None:
    app = cdk_app.build_app(
        {"sip_cidrs": "203.0.113.10/32", "ami": "ami-0123456789abcdef0", "alarm_email": ""}
    )
    ours: dict[str, str] = {}
    for c in app.node.find_all():
        for m in c.node.metadata:
            if m.type == "aws:cdk:acknowledged-rules":
                ours.update({k: v for k, v in m.data.items() if k.startswith("AwsSolutions::")})
    assert set(ours) == {
        "AwsSolutions::AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
        "AwsSolutions::AwsSolutions-IAM5[Resource::*]",
        "AwsSolutions::AwsSolutions-IAM5[Resource::<OperationsTraceBucketAE416723.Arn>/traces/*]",
        "AwsSolutions::AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:*]",
        "AwsSolutions::AwsSolutions-S1",
        "AwsSolutions::AwsSolutions-EC29",
    }
    for rule, reason in ours.items():
        assert len(reason.split()) >= 12, (rule, reason)
