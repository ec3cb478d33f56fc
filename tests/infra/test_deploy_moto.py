"""Day 1 and Day 2 with the real CDK CLI against a moto server on loopback, read back with boto3.

A copy of the app (app.py, cdk.json, infra/, the runtime, its wheels) and a site settings file in a
scratch directory: `cdk bootstrap`, `cdk deploy`; then a new carrier CIDR, a shorter timeout and a
changed file of the proxy, `cdk diff` and `cdk deploy` again; then `cdk destroy`, and a rebuilt
stack that adopts the retained addresses.

Moto implements CloudFormation for most of what the stack builds (VPC, subnets, security group
rules, instances, Elastic IPs, SNS, S3, IAM, SSM parameters and documents); it skips alarms, EIP
associations, policies and State Manager associations with a warning, and it does not wait for
cfn-signal. What it skips is read back from the template CloudFormation stored for the stack.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from infra import wheels

from .conftest import AMI, REPO, cdk_cli, cli_env

pytestmark = pytest.mark.slow

REGION = "us-east-1"
ACCOUNT = "123456789012"
SITE = f"""
sip_cidrs = ["203.0.113.10/32", "198.51.100.0/28"]
ssh_cidr = "192.0.2.0/29"
alarm_email = "noc@example.net"
ami = "{AMI}"
timeout = 5
"""
# Day 2: a new carrier network, a shorter timeout.
SITE_2 = SITE.replace('"198.51.100.0/28"]', '"198.51.100.0/28", "192.0.2.128/25"]').replace(
    "timeout = 5", "timeout = 3"
)
CHANGED_FILE = "proxy_runtime/core/routing.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Site:
    """The operator's checkout: the app and site.toml, and the CDK CLI run against moto."""

    def __init__(self, root: Path, endpoint: str) -> None:
        self.root = root
        self.endpoint = endpoint
        self.env = cli_env(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
        )
        self.session = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )

    def cdk(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [cdk_cli(), *args, "--output", str(self.root / "cdk.out")]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=420)
        if check:
            assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def deploy(self, stack: str = "ClearIpProxy") -> None:
        # --method=direct: CreateStack/UpdateStack instead of a change set; moto's change-set
        # execution does not record the stack's outputs, which these tests read.
        # --previous-parameters=false: moto's UpdateStack cannot reuse the previous value of the
        # BootstrapVersion parameter (KeyError); its default is the same value.
        self.cdk(
            "deploy", stack, "--require-approval", "never", "--method=direct", "--previous-parameters=false",
            "--progress", "events",
        )  # fmt: skip

    def destroy(self, stack: str) -> subprocess.CompletedProcess[str]:
        """`python -m infra.destroy` (`make destroy`): `cdk destroy`, then what was kept.

        Moto's CloudFormation cannot delete an AWS::EC2::RouteTable, so a VPC with
        subnets stays "with dependencies" and the delete fails there; real CloudFormation deletes
        them itself. Remove the stack's subnet route tables first, as CloudFormation would.
        (Moto also never releases an Elastic IP when a stack goes, retained or not: the retention
        itself is asserted on the template, test_stack.py.)"""
        ec2 = self.client("ec2")
        for rt in ec2.describe_route_tables(
            Filters=[{"Name": "tag:aws:cloudformation:stack-name", "Values": [stack]}]
        )["RouteTables"]:
            if any(a.get("Main") for a in rt["Associations"]):
                continue
            for a in rt["Associations"]:
                ec2.disassociate_route_table(AssociationId=a["RouteTableAssociationId"])
            ec2.delete_route_table(RouteTableId=rt["RouteTableId"])
        cmd = [str(self.root / ".venv/bin/python"), "-m", "infra.destroy", "--stack", stack, "--force"]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, f"destroy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def client(self, service: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint)

    def outputs(self, stack: str = "ClearIpProxy") -> dict[str, str]:
        (s,) = self.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
        assert s["StackStatus"] in ("CREATE_COMPLETE", "UPDATE_COMPLETE"), s["StackStatus"]
        return {o["OutputKey"]: o["OutputValue"] for o in s["Outputs"]}

    def template(self, stack: str = "ClearIpProxy") -> dict[str, Any]:
        body = self.client("cloudformation").get_template(StackName=stack)["TemplateBody"]
        return body if isinstance(body, dict) else dict(json.loads(body))

    def parameter(self, name: str) -> str:
        return str(self.client("ssm").get_parameter(Name=name)["Parameter"]["Value"])

    def addresses(self) -> dict[str, str]:
        """allocation id -> public IP of every Elastic IP in the account."""
        return {
            a["AllocationId"]: a["PublicIp"] for a in self.client("ec2").describe_addresses()["Addresses"]
        }

    def asset(self, url: str) -> zipfile.ZipFile:
        bucket, key = url.removeprefix("s3://").split("/", 1)
        body = self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        return zipfile.ZipFile(io.BytesIO(body))


def _copy_app(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("infra", "proxy_runtime", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in (
        "app.py",
        "cdk.json",
        "pyproject.toml",
        "setup.py",
        "requirements-runtime.txt",
        "requirements-runtime.lock",
        "requirements-build.lock",
    ):
        shutil.copy2(REPO / name, dest / name)
    wheels.download()  # make wheels (cached)
    shutil.copytree(REPO / "wheels", dest / "wheels")
    (dest / ".venv").symlink_to(REPO / ".venv")
    (dest / "node_modules").symlink_to(REPO / "node_modules")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        root = tmp_path_factory.mktemp("site")
        _copy_app(root)
        (root / "site.toml").write_text(SITE)
        s = Site(root, f"http://localhost:{port}")
        s.cdk("bootstrap", f"aws://{ACCOUNT}/{REGION}")
        yield s
    finally:
        server.stop()


@pytest.fixture(scope="module")
def day1(site: Site) -> dict[str, Any]:
    site.deploy()
    return {
        "outputs": site.outputs(),
        "template": site.template(),
        "addresses": site.addresses(),
        "release": site.parameter("/ClearIpProxy/clearip-proxy/release"),
    }


@pytest.fixture(scope="module")
def day2(site: Site, day1: dict[str, Any]) -> dict[str, Any]:
    """Change a CIDR, the timeout and a file of the proxy in the operator's checkout; diff; deploy."""
    (site.root / "site.toml").write_text(SITE_2)
    changed = site.root / CHANGED_FILE
    changed.write_text(changed.read_text() + "\n# day 2 release\n")
    diff = site.cdk("diff", "ClearIpProxy", "--no-change-set")
    site.deploy()
    return {
        "diff": diff.stdout + diff.stderr,
        "outputs": site.outputs(),
        "template": site.template(),
        "addresses": site.addresses(),
        "release": site.parameter("/ClearIpProxy/clearip-proxy/release"),
        "settings": site.parameter("/ClearIpProxy/clearip-proxy/settings"),
    }


def _of_type(template: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def _release_associations(template: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        a
        for a in _of_type(template, "AWS::SSM::Association").values()
        if "ReleaseId" in a["Properties"].get("Parameters", {})
    ]


# ---- day 1 -----------------------------------------------------------------------------------
def test_day1_stack_and_outputs(site: Site, day1: dict[str, Any]) -> None:
    outputs = day1["outputs"]
    for n in (1, 2):
        assert outputs[f"Proxy{n}InstanceId"].startswith("i-")
        assert outputs[f"Proxy{n}PublicIp"].count(".") == 3
        assert day1["addresses"][outputs[f"Proxy{n}AllocationId"]] == outputs[f"Proxy{n}PublicIp"]
    assert "#dashboards:name=ClearIpProxy" in outputs["DashboardUrl"]
    assert outputs["AlarmTopicArn"].startswith(f"arn:aws:sns:{REGION}:{ACCOUNT}:")
    reservations = site.client("ec2").describe_instances(
        InstanceIds=[outputs["Proxy1InstanceId"], outputs["Proxy2InstanceId"]]
    )["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    assert {i["ImageId"] for i in instances} == {AMI}  # the recorded image
    assert all(i["InstanceType"] == "t3.medium" for i in instances)


def test_day1_settings_and_release_parameters(site: Site, day1: dict[str, Any]) -> None:
    settings = tomllib.loads(site.parameter("/ClearIpProxy/clearip-proxy/settings"))
    assert settings == {
        "clearip": "sip:sip.clearip.com:5061;transport=tls",
        "timeout": 5.0,
        "allow": ["203.0.113.10/32", "198.51.100.0/28"],
        "metrics": "cloudwatch",
    }
    url, _hash = day1["release"].split()
    names = site.asset(url).namelist()
    assert "deploy/install.sh" in names and "requirements-runtime.lock" in names
    assert {n.split("/")[1] for n in names if n.startswith("wheels/") and n.endswith(".whl")} == set(
        wheels.ARCHES
    )


def test_day1_documents(site: Site, day1: dict[str, Any]) -> None:
    docs = site.client("ssm").list_documents(Filters=[{"Key": "Owner", "Values": ["Self"]}], MaxResults=50)[
        "DocumentIdentifiers"
    ]
    ours = {d["Name"] for d in docs if d["Name"].startswith("ClearIpProxy-")}
    assert ours == {
        f"ClearIpProxy-{k}"
        for k in (
            "Doctor",
            "CaptureTrace",
            "Restart",
            "SetClearIpTransport",
            "SetTimeout",
            "ApplyRelease",
            "CloudWatchAgent",  # infra/logs.py: installs and configures the agent
            "ProxySession",  # infra/logs.py: the logged shell session
        )
    }
    types = {d["Name"]: d["DocumentType"] for d in docs}
    assert types["ClearIpProxy-ProxySession"] == "Session"


def test_day1_log_groups_and_alarm_status(site: Site, day1: dict[str, Any]) -> None:
    """infra/logs.py and the dashboard as deployed: log groups with retention, the alarm status."""
    groups = {
        g["logGroupName"]: g.get("retentionInDays")
        for g in site.client("logs").describe_log_groups(logGroupNamePrefix="/clearip-proxy/ClearIpProxy/")[
            "logGroups"
        ]
    }
    assert groups == {
        "/clearip-proxy/ClearIpProxy/calls": 90,
        "/clearip-proxy/ClearIpProxy/proxy": 30,
        "/clearip-proxy/ClearIpProxy/bootstrap": 30,
        "/clearip-proxy/ClearIpProxy/sessions": 365,
    }
    # The dashboard as stored: the alarm status widget on top, naming every alarm by an ARN built
    # from its sentence (moto does not create the alarms themselves, nor list associations).
    body = json.loads(site.client("cloudwatch").get_dashboard(DashboardName="ClearIpProxy")["DashboardBody"])
    top = body["widgets"][0]
    assert top["type"] == "alarm"
    arns = top["properties"]["alarms"]
    assert len(arns) == 2 * 12
    prefix = f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:"
    assert prefix + "ClearIpProxy Proxy1 drops SIP from sources it does not trust" in arns


# ---- day 2 -----------------------------------------------------------------------------------
def test_day2_diff_replaces_no_address_and_no_instance(day2: dict[str, Any]) -> None:
    diff = day2["diff"]
    assert "AWS::SSM::Association" in diff and "AWS::SSM::Parameter" in diff  # what carries the change
    for line in diff.splitlines():
        if "replace" in line.lower():
            assert "AWS::EC2::EIP" not in line and "AWS::EC2::Instance" not in line, line
    assert "[-] AWS::EC2::EIP" not in diff and "[-] AWS::EC2::Instance" not in diff


def test_day2_addresses_and_instances_untouched(day1: dict[str, Any], day2: dict[str, Any]) -> None:
    for n in (1, 2):
        for key in (f"Proxy{n}InstanceId", f"Proxy{n}PublicIp", f"Proxy{n}AllocationId"):
            assert day2["outputs"][key] == day1["outputs"][key], key
    assert day2["addresses"] == day1["addresses"]
    # The instances are unchanged in the template: user data holds nothing that changed.
    assert _of_type(day2["template"], "AWS::EC2::Instance") == _of_type(
        day1["template"], "AWS::EC2::Instance"
    )
    assert _of_type(day2["template"], "AWS::EC2::EIP") == _of_type(day1["template"], "AWS::EC2::EIP")


def test_day2_each_proxy_gets_the_new_settings_and_code_one_at_a_time(
    site: Site, day1: dict[str, Any], day2: dict[str, Any]
) -> None:
    """The association the second deploy wrote: both proxies targeted, MaxConcurrency 1, MaxErrors 0,
    carrying the new asset (which holds the changed file) and the new settings."""
    # The release's association (infra/logs.py adds the CloudWatch agent's beside it).
    (assoc,) = _release_associations(day2["template"])
    (old,) = _release_associations(day1["template"])
    props = assoc["Properties"]
    assert props["MaxConcurrency"] == "1" and props["MaxErrors"] == "0"
    assert props["WaitForSuccessTimeoutSeconds"] > 0
    instances = sorted(_of_type(day2["template"], "AWS::EC2::Instance"))
    assert props["Targets"] == [{"Key": "InstanceIds", "Values": [{"Ref": i} for i in instances]}]
    params = props["Parameters"]
    assert params["ReleaseId"] != old["Properties"]["Parameters"]["ReleaseId"]
    settings = base64.b64decode(params["Settings"][0]).decode()
    assert settings == day2["settings"]
    assert tomllib.loads(settings) == {
        "clearip": "sip:sip.clearip.com:5061;transport=tls",
        "timeout": 3.0,
        "allow": ["203.0.113.10/32", "198.51.100.0/28", "192.0.2.128/25"],
        "metrics": "cloudwatch",
    }
    # The release parameter (what a replaced proxy boots with) names the new asset, which holds the
    # changed file; the association carries the same release.
    url, release_id = day2["release"].split()
    assert release_id == params["ReleaseId"][0] and day2["release"] != day1["release"]
    assert "# day 2 release" in site.asset(url).read(CHANGED_FILE).decode()
    assert "# day 2 release" not in site.asset(day1["release"].split()[0]).read(CHANGED_FILE).decode()


def test_day2_security_group_admits_the_new_carrier(site: Site, day2: dict[str, Any]) -> None:
    groups = site.client("ec2").describe_security_groups()["SecurityGroups"]
    (group,) = [g for g in groups if g["Description"].startswith("ClearIP proxies")]
    got = {
        (p["IpProtocol"], p["FromPort"], r["CidrIp"])
        for p in group["IpPermissions"]
        for r in p.get("IpRanges", [])
    }
    want = {
        (proto, port, cidr)
        for cidr in ("203.0.113.10/32", "198.51.100.0/28", "192.0.2.128/25")
        for proto, port in (("udp", 5060), ("tcp", 5060), ("tcp", 5061))
    } | {("tcp", 22, "192.0.2.0/29")}
    assert got == want


# ---- destroy and rebuild behind the same addresses ----------------------------------------------
def test_destroy_keeps_the_addresses_and_a_rebuilt_stack_adopts_them(
    site: Site, day2: dict[str, Any]
) -> None:
    kept = {day2["outputs"][f"Proxy{n}AllocationId"]: day2["outputs"][f"Proxy{n}PublicIp"] for n in (1, 2)}
    said = site.destroy("ClearIpProxy").stdout
    for n, (alloc, address) in enumerate(kept.items(), start=1):
        assert f"Proxy{n}'s Elastic IP {address} ({alloc})" in said  # it says what it keeps
    stacks = site.client("cloudformation").list_stacks()["StackSummaries"]
    assert all(s["StackStatus"] == "DELETE_COMPLETE" for s in stacks if s["StackName"] == "ClearIpProxy")
    assert set(kept.items()) <= set(site.addresses().items())  # retained, still allocated

    # The site rebuilt from scratch, adopting both addresses in proxy order with the settings that
    # destroy printed, as printed.
    adopt = "\n" + said[said.index("[[eip_allocations]]") : said.index("Release an address")]
    assert tomllib.loads(adopt)["eip_allocations"] == [
        {"allocation_id": alloc, "address": address} for alloc, address in kept.items()
    ]
    (site.root / "site.toml").write_text(SITE_2.replace("ami =", 'stack_name = "Rebuilt"\nami =') + adopt)
    before = site.addresses()
    site.deploy("Rebuilt")
    outputs = site.outputs("Rebuilt")
    for n, (alloc, address) in enumerate(kept.items(), start=1):
        assert outputs[f"Proxy{n}AllocationId"] == alloc and outputs[f"Proxy{n}PublicIp"] == address
    assert site.addresses() == before  # no new address allocated
    template = site.template("Rebuilt")
    assert _of_type(template, "AWS::EC2::EIP") == {}
    assert sorted(
        a["Properties"]["AllocationId"] for a in _of_type(template, "AWS::EC2::EIPAssociation").values()
    ) == sorted(kept)

    site.destroy("Rebuilt")
    assert set(kept.items()) <= set(site.addresses().items())
