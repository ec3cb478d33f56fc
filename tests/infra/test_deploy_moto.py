"""The real `cdk bootstrap` and `cdk deploy` against a moto server on loopback, read back with boto3.

Moto implements CloudFormation for most of what the stack builds (VPC, subnets, security group
rules, instances, Elastic IPs, SNS, S3, IAM); it skips alarms, EIP associations and policies with a
warning, and it does not wait for cfn-signal. The test asserts what moto does create.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from .conftest import REPO, cdk_cli, cli_env

pytestmark = pytest.mark.slow

REGION = "us-east-1"
ACCOUNT = "123456789012"
CONTEXT = {
    "sip_cidrs": "203.0.113.10/32,198.51.100.0/28",
    "ssh_cidr": "192.0.2.0/29",
    "alarm_email": "noc@example.net",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://localhost:{port}"
    env = cli_env(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,
    )
    out = tmp_path_factory.mktemp("cdk-out-moto")
    ctx = [arg for k, v in CONTEXT.items() for arg in ("-c", f"{k}={v}")]
    try:
        for cmd in (
            [cdk_cli(), "bootstrap", f"aws://{ACCOUNT}/{REGION}", *ctx, "--output", str(out)],
            # --method=direct: CreateStack instead of a change set; moto's change-set execution
            # does not record the stack's outputs, which this test reads.
            [
                cdk_cli(),
                "deploy",
                "--require-approval",
                "never",
                "--method=direct",
                *ctx,
                "--output",
                str(out),
                "--progress",
                "events",
            ],
        ):
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{cmd[1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        session = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        yield {"session": session, "endpoint": endpoint, "out": Path(out)}
    finally:
        server.stop()


def client(deployed: dict[str, Any], service: str) -> Any:
    return deployed["session"].client(service, endpoint_url=deployed["endpoint"])


def _outputs(deployed: dict[str, Any]) -> dict[str, str]:
    (stack,) = client(deployed, "cloudformation").describe_stacks(StackName="ClearIpProxy")["Stacks"]
    assert stack["StackStatus"] in ("CREATE_COMPLETE", "UPDATE_COMPLETE")
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def test_stack_and_outputs(deployed: dict[str, Any]) -> None:
    outputs = _outputs(deployed)
    for n in (1, 2):
        assert outputs[f"Proxy{n}InstanceId"].startswith("i-")
        assert outputs[f"Proxy{n}PublicIp"].count(".") == 3
    assert "#dashboards:name=ClearIpProxy" in outputs["DashboardUrl"]
    assert outputs["AlarmTopicArn"].startswith(f"arn:aws:sns:{REGION}:{ACCOUNT}:")


def test_vpc(deployed: dict[str, Any]) -> None:
    ec2 = client(deployed, "ec2")
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.60.0.0/16"]}])["Vpcs"]
    assert len(vpcs) == 1
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]}])["Subnets"]
    assert len(subnets) == 2
    assert len({s["AvailabilityZone"] for s in subnets}) == 2
    assert ec2.describe_nat_gateways()["NatGateways"] == []


def test_instances(deployed: dict[str, Any]) -> None:
    outputs = _outputs(deployed)
    ids = [outputs["Proxy1InstanceId"], outputs["Proxy2InstanceId"]]
    reservations = client(deployed, "ec2").describe_instances(InstanceIds=ids)["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    assert len(instances) == 2
    for inst in instances:
        assert inst["InstanceType"] == "t3.medium"
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        assert tags.get("clearip-proxy") == "ClearIpProxy"


def test_elastic_ips(deployed: dict[str, Any]) -> None:
    outputs = _outputs(deployed)
    addresses = client(deployed, "ec2").describe_addresses()["Addresses"]
    public = {a["PublicIp"] for a in addresses}
    assert {outputs["Proxy1PublicIp"], outputs["Proxy2PublicIp"]} <= public
    assert all(a["Domain"] == "vpc" for a in addresses)


def test_security_group_rules(deployed: dict[str, Any]) -> None:
    groups = client(deployed, "ec2").describe_security_groups()["SecurityGroups"]
    (group,) = [g for g in groups if g["Description"].startswith("ClearIP proxies")]
    got = {
        (p["IpProtocol"], p["FromPort"], r["CidrIp"])
        for p in group["IpPermissions"]
        for r in p.get("IpRanges", [])
    }
    want = {
        (proto, port, cidr)
        for cidr in ("203.0.113.10/32", "198.51.100.0/28")
        for proto, port in (("udp", 5060), ("tcp", 5060), ("tcp", 5061))
    } | {("tcp", 22, "192.0.2.0/29")}
    assert got == want
    egress = {r["CidrIp"] for p in group["IpPermissionsEgress"] for r in p.get("IpRanges", [])}
    assert "0.0.0.0/0" in egress


def test_topic(deployed: dict[str, Any]) -> None:
    # Moto's CloudFormation skips AWS::SNS::Subscription; test_stack.py asserts the e-mail one.
    arn = _outputs(deployed)["AlarmTopicArn"]
    sns = client(deployed, "sns")
    assert arn in {t["TopicArn"] for t in sns.list_topics()["Topics"]}
    assert sns.get_topic_attributes(TopicArn=arn)["Attributes"]["DisplayName"] == "ClearIpProxy alarms"


def test_ssm_documents(deployed: dict[str, Any]) -> None:
    # list_documents, not describe_document: moto cannot hash a document created from JSON content.
    ssm = client(deployed, "ssm")
    docs = ssm.list_documents(Filters=[{"Key": "Owner", "Values": ["Self"]}], MaxResults=50)[
        "DocumentIdentifiers"
    ]
    ours = {d["Name"]: d for d in docs if d["Name"].startswith("ClearIpProxy-")}
    assert set(ours) == {
        f"ClearIpProxy-{k}"
        for k in ("Doctor", "CaptureTrace", "Restart", "SetClearIpTransport", "SetTimeout")
    }
    assert all(d["DocumentType"] == "Command" for d in ours.values())


def test_trace_bucket_and_code_asset(deployed: dict[str, Any]) -> None:
    s3 = client(deployed, "s3")
    bucket = _outputs(deployed)["TraceBucketName"]
    assert bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    staging = f"cdk-hnb659fds-assets-{ACCOUNT}-{REGION}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=staging).get("Contents", [])]
    assert any(k.endswith(".zip") for k in keys), keys  # the proxy's code asset was published
