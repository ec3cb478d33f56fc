"""Assertion tests for every numbered point of issue 3 and the operations construct (issue 6.3)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk.assertions import Capture, Match, Template

from infra.monitoring import MonitoredProxy, ProxyMonitoring
from infra.network import ProxyNetwork
from infra.release import ASSET_EXCLUDE
from infra.settings import AlarmThresholds, DeploymentSettings
from infra.stack import ClearIpProxyStack
from infra.wheels import ARCHES, complete
from proxy_runtime.metrics import names
from proxy_runtime.settings import MAX_METRICS_INTERVAL

from .conftest import ADOPTED, AMI, DEFAULT_CONTEXT, REPO, flatten, resources


# ---- 1. network ------------------------------------------------------------------------------
def test_dedicated_vpc_over_two_azs_public_only_no_nat(template: Template) -> None:
    template.resource_count_is("AWS::EC2::VPC", 1)
    template.resource_count_is("AWS::EC2::Subnet", 2)
    template.resource_count_is("AWS::EC2::NatGateway", 0)
    template.resource_count_is("AWS::EC2::InternetGateway", 1)
    template.all_resources_properties("AWS::EC2::Subnet", {"MapPublicIpOnLaunch": True})
    # Env-agnostic: the AZs come from Fn::GetAZs at deploy time, one subnet in each of the first two.
    for index in (0, 1):
        template.has_resource_properties(
            "AWS::EC2::Subnet", {"AvailabilityZone": {"Fn::Select": [index, {"Fn::GetAZs": ""}]}}
        )
    routes = template.find_resources("AWS::EC2::Route")
    assert len(routes) == 2
    assert all("GatewayId" in r["Properties"] for r in routes.values())


def test_vpc_flow_logs(template: Template) -> None:
    template.has_resource_properties(
        "AWS::EC2::FlowLog",
        {"ResourceType": "VPC", "TrafficType": "ALL", "LogDestinationType": "cloud-watch-logs"},
    )
    template.has_resource_properties("AWS::Logs::LogGroup", {"RetentionInDays": Match.any_value()})


# ---- 2. security groups ----------------------------------------------------------------------
def _ingress(tpl: Template) -> list[dict[str, Any]]:
    groups = tpl.find_resources("AWS::EC2::SecurityGroup")
    assert len(groups) == 1
    (group,) = groups.values()
    rules = group["Properties"].get("SecurityGroupIngress", [])
    return sorted(
        rules, key=lambda r: (r.get("CidrIp", r.get("CidrIpv6", "")), r["IpProtocol"], r["FromPort"])
    )


def test_sip_only_from_trusted_cidrs_and_no_ssh_by_default(template: Template) -> None:
    got = {(r["CidrIp"], r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in _ingress(template)}
    want = {
        (cidr, proto, port, port)
        for cidr in ("203.0.113.10/32", "198.51.100.0/28")
        for proto, port in (("udp", 5060), ("tcp", 5060), ("tcp", 5061))
    }
    assert got == want
    assert not any(r["FromPort"] == 22 for r in _ingress(template))


def test_ssh_only_when_ssh_cidr_given_and_ipv6_cidrs(full_template: Template) -> None:
    rules = _ingress(full_template)
    ssh = [r for r in rules if r["FromPort"] == 22]
    assert len(ssh) == 1
    assert ssh[0]["CidrIp"] == "192.0.2.0/29" and ssh[0]["IpProtocol"] == "tcp"
    v6 = {(r["IpProtocol"], r["FromPort"]) for r in rules if r.get("CidrIpv6") == "2001:db8::/48"}
    assert v6 == {("udp", 5060), ("tcp", 5060), ("tcp", 5061)}
    assert len(rules) == 3 * 3 + 1


def test_outbound_unrestricted(template: Template) -> None:
    template.has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {"SecurityGroupEgress": [Match.object_like({"CidrIp": "0.0.0.0/0", "IpProtocol": "-1"})]},
    )


# ---- 3. the proxies --------------------------------------------------------------------------
def test_two_proxies_in_different_azs_by_default(template: Template) -> None:
    template.resource_count_is("AWS::EC2::Instance", 2)
    azs = Capture()
    template.has_resource_properties("AWS::EC2::Instance", {"AvailabilityZone": azs})
    instances = template.find_resources("AWS::EC2::Instance")
    zones = [json.dumps(i["Properties"]["AvailabilityZone"], sort_keys=True) for i in instances.values()]
    assert len(set(zones)) == 2
    # Each instance sits in a different subnet, on its own primary interface (no pre-made one that a
    # replacement could not take over).
    subnets = {json.dumps(i["Properties"]["SubnetId"]) for i in instances.values()}
    assert len(subnets) == 2
    template.resource_count_is("AWS::EC2::NetworkInterface", 0)


def test_instance_hardening_and_defaults(template: Template) -> None:
    template.all_resources_properties(
        "AWS::EC2::Instance",
        {
            "InstanceType": "t3.medium",
            # No termination protection: a replaced instance can be deleted, and `cdk destroy` works.
            "DisableApiTermination": Match.absent(),
            "Monitoring": True,
            "MetadataOptions": Match.object_like({"HttpTokens": "required"}),
            "BlockDeviceMappings": [
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": Match.object_like(
                        {"Encrypted": True, "VolumeType": "gp3", "DeleteOnTermination": True}
                    ),
                }
            ],
            "KeyName": Match.absent(),
            # The recorded image, not one resolved at deploy time.
            "ImageId": AMI,
        },
    )
    params = template.to_json().get("Parameters", {})
    assert not [p for p in params.values() if "ami" in str(p.get("Default", ""))]


def test_count_type_and_key_pair_from_settings(full_template: Template) -> None:
    full_template.resource_count_is("AWS::EC2::Instance", 3)
    full_template.all_resources_properties(
        "AWS::EC2::Instance", {"InstanceType": "c6i.large", "KeyName": "noc-key"}
    )


def test_each_proxy_has_a_retained_elastic_ip(template: Template) -> None:
    tpl = template.to_json()
    eips = resources(tpl, "AWS::EC2::EIP")
    assocs = resources(tpl, "AWS::EC2::EIPAssociation")
    instances = resources(tpl, "AWS::EC2::Instance")
    assert len(eips) == len(assocs) == 2
    template.all_resources_properties("AWS::EC2::EIP", {"Domain": "vpc"})
    # Whitelisted by ClearIP and carriers: kept when the stack is deleted or the resource replaced.
    template.all_resources("AWS::EC2::EIP", {"DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"})
    paired = set()
    for assoc in assocs.values():
        alloc = assoc["Properties"]["AllocationId"]["Fn::GetAtt"][0]
        inst = assoc["Properties"]["InstanceId"]["Ref"]
        assert alloc in eips and inst in instances
        paired.add((alloc, inst))
    assert len(paired) == 2


def test_proxies_are_replaced_one_at_a_time(template: Template, full_template: Template) -> None:
    """Each proxy waits for the previous one's instance and address: CloudFormation creates or replaces
    them in sequence, and a new proxy that does not signal stops the deploy before the next."""
    for tpl in (template.to_json(), full_template.to_json()):
        instances = resources(tpl, "AWS::EC2::Instance")
        assocs = resources(tpl, "AWS::EC2::EIPAssociation")
        by_instance = {a["Properties"]["InstanceId"]["Ref"]: k for k, a in assocs.items()}
        waits = {
            k: set(v.get("DependsOn", [])) & (set(instances) | set(assocs)) for k, v in instances.items()
        }
        order = sorted(instances, key=lambda k: len(waits[k]))
        assert waits[order[0]] == set()
        for prev, nxt in itertools.pairwise(order):
            assert {prev, by_instance[prev]} <= waits[nxt], nxt


def test_adopted_allocations_keep_their_address(full_template: Template) -> None:
    """eip_allocations: Proxy1 takes the existing address (no new EIP); the others get new ones."""
    tpl = full_template.to_json()
    assert len(resources(tpl, "AWS::EC2::EIP")) == 2  # 3 proxies, one adopted
    full_template.has_resource_properties("AWS::EC2::EIPAssociation", {"AllocationId": ADOPTED[0]})
    outputs = tpl["Outputs"]
    assert outputs["Proxy1PublicIp"]["Value"] == ADOPTED[1]
    assert outputs["Proxy1AllocationId"]["Value"] == ADOPTED[0]
    assert "Fn::GetAtt" in outputs["Proxy2AllocationId"]["Value"]
    proxy1 = next(v for k, v in resources(tpl, "AWS::EC2::Instance").items() if "Proxy1" in k)
    assert f"ELASTIC_IP='{ADOPTED[1]}'" in flatten(proxy1["Properties"]["UserData"])


# ---- 4. the software on them -----------------------------------------------------------------
def test_creation_policy_waits_for_cfn_signal(template: Template) -> None:
    template.all_resources(
        "AWS::EC2::Instance",
        {
            "CreationPolicy": {
                "ResourceSignal": {"Count": 1, "Timeout": Match.string_like_regexp(r"^PT\d+M$")}
            }
        },
    )


def _user_data(tpl: Mapping[str, Any]) -> list[str]:
    return [flatten(i["Properties"]["UserData"]) for i in resources(tpl, "AWS::EC2::Instance").values()]


def test_user_data_holds_only_what_never_changes(template: Template, full_template: Template) -> None:
    """User data runs at first boot only, and a change to it stops and starts the instance: it names
    the parameters to read, never the release or the settings themselves."""
    for text in _user_data(template.to_json()):
        assert text.startswith("#!/bin/bash\n")
        assert "RELEASE_PARAMETER='/ClearIpProxy/clearip-proxy/release'" in text
        assert "SETTINGS_PARAMETER='/ClearIpProxy/clearip-proxy/settings'" in text
        assert 'bash "$WORK/src/deploy/install.sh"' in text and "--offline" in text
        assert "203.0.113.10/32" not in text and "s3://" not in text and "TIMEOUT" not in text
        assert "tcpdump" in text
        assert "cfn-signal" in text and "signal 0" in text and "signal 1" in text
    for text in _user_data(full_template.to_json()):
        assert "RELEASE_PARAMETER='/SiteB/clearip-proxy/release'" in text


def test_user_data_signals_its_own_instance(template: Template) -> None:
    tpl = template.to_json()
    for logical_id, inst in resources(tpl, "AWS::EC2::Instance").items():
        text = flatten(inst["Properties"]["UserData"])
        assert f"RESOURCE='{logical_id}'" in text
        refs = [
            p["Ref"]
            for p in inst["Properties"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
            if isinstance(p, dict) and "Ref" in p
        ]
        eips = resources(tpl, "AWS::EC2::EIP")
        assert len([r for r in refs if r in eips]) == 1  # its own Elastic IP (Ref = the address)


def test_release_and_settings_parameters(template: Template, full_template: Template) -> None:
    release = Capture()
    template.has_resource_properties(
        "AWS::SSM::Parameter",
        {"Name": "/ClearIpProxy/clearip-proxy/release", "Type": "String", "Value": release},
    )
    refs = {"AWS::AccountId": "123456789012", "AWS::Region": "us-east-1"}
    assert re.fullmatch(
        r"s3://cdk-hnb659fds-assets-123456789012-us-east-1/[0-9a-f]{64}\.zip [0-9a-f]{64}",
        flatten(release.as_object(), refs),
    )
    settings = Capture()
    template.has_resource_properties(
        "AWS::SSM::Parameter", {"Name": "/ClearIpProxy/clearip-proxy/settings", "Value": settings}
    )
    text = settings.as_string()
    assert 'allow = ["203.0.113.10/32", "198.51.100.0/28"]' in text
    assert 'clearip = "sip:sip.clearip.com:5061;transport=tls"' in text
    assert "timeout = 5.0" in text and 'metrics = "cloudwatch"' in text
    assert "advertise" not in text and "proxy_id" not in text  # host fields stay on the host
    full = Capture()
    full_template.has_resource_properties(
        "AWS::SSM::Parameter", {"Name": "/SiteB/clearip-proxy/settings", "Value": full}
    )
    assert 'clearip = "sip:sip.clearip.com:5060;transport=tcp"' in full.as_string()
    assert "ring_timeout = 90.0" in full.as_string() and 'copy_headers = ["Identity"]' in full.as_string()


def test_release_association_rolls_out_one_proxy_at_a_time(template: Template) -> None:
    import base64

    tpl = template.to_json()
    instances = sorted(resources(tpl, "AWS::EC2::Instance"))
    params = Capture()
    template.has_resource_properties(
        "AWS::SSM::Association",
        {
            "Name": "ClearIpProxy-ApplyRelease",
            "MaxConcurrency": "1",
            "MaxErrors": "0",
            "WaitForSuccessTimeoutSeconds": Match.any_value(),
            "Targets": [{"Key": "InstanceIds", "Values": [{"Ref": i} for i in instances]}],
            "Parameters": params,
        },
    )
    p = params.as_object()
    assert set(p) == {"AssetUrl", "ReleaseId", "Settings", "Region"}
    refs = {"AWS::AccountId": "123456789012", "AWS::Region": "us-east-1"}
    release = next(
        flatten(v["Properties"]["Value"], refs)
        for v in resources(tpl, "AWS::SSM::Parameter").values()
        if v["Properties"]["Name"].endswith("/release")
    )
    assert [flatten(p["AssetUrl"][0], refs), p["ReleaseId"][0]] == release.split()
    settings = next(
        v["Properties"]["Value"]
        for v in resources(tpl, "AWS::SSM::Parameter").values()
        if v["Properties"]["Name"].endswith("/settings")
    )
    assert base64.b64decode(p["Settings"][0]).decode() == settings
    template.has_resource_properties(
        "AWS::SSM::Document",
        {
            "Name": "ClearIpProxy-ApplyRelease",
            "DocumentType": "Command",
            "Content": Match.object_like(
                {
                    "mainSteps": [
                        Match.object_like(
                            {
                                "inputs": Match.object_like(
                                    {"runCommand": Match.array_with([Match.string_like_regexp("install.sh")])}
                                )
                            }
                        )
                    ]
                }
            ),
        },
    )


def test_asset_holds_only_the_runtime(default_stack: ClearIpProxyStack, template: Template) -> None:
    app = default_stack.node.root
    assert isinstance(app, cdk.App)
    asset = default_stack.release.asset
    root = Path(app.outdir) / asset.asset_path
    top = sorted(p.name for p in root.iterdir())
    want = [
        "deploy",
        "proxy_runtime",
        "pyproject.toml",
        "requirements-build.lock",
        "requirements-runtime.lock",
        "requirements-runtime.txt",
        "setup.py",
    ]
    assert top in (want, sorted([*want, "wheels"]))
    if complete():  # after `make wheels`: every wheel for both architectures travels in the asset
        locks = (root / "requirements-runtime.lock", root / "requirements-build.lock")
        assert complete(root / "wheels", locks)  # the runtime's and the compiler's (mypy) wheels
        assert sorted(p.name for p in (root / "wheels").iterdir()) == sorted(ARCHES)
    assert (root / "deploy" / "install.sh").is_file()
    assert (root / "deploy" / "clearip-proxy.service").is_file()
    assert (root / "proxy_runtime" / "metrics" / "names.py").is_file()
    assert not list(root.rglob("__pycache__")) and not list(root.rglob(".*"))
    assert ASSET_EXCLUDE[0] == "*"  # an allow-list: anything new at the top level stays out


def test_asset_never_carries_compiled_modules(tmp_path: Path) -> None:
    """Each instance compiles the core itself (deploy/install.sh): a work tree holding a compiled build
    (`make compiled`'s build/, an in-place *.so, egg-info) gives the same asset, byte for byte, as a
    clean one, so a synth on any machine gives the same asset hash and restarts no proxy."""
    runtime = ("proxy_runtime", "deploy", "setup.py", "pyproject.toml", "requirements-runtime.txt",
               "requirements-runtime.lock", "requirements-build.lock")  # fmt: skip
    hashes = []
    for name in ("clean", "built"):
        tree = tmp_path / name
        for item in runtime:
            src = REPO / item
            if src.is_dir():
                shutil.copytree(src, tree / item, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            else:
                shutil.copy2(src, tree / item)
        if name == "built":
            (tree / "proxy_runtime/core/proxy.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
            (tree / "proxy_runtime/sip/message.cpython-311-aarch64-linux-gnu.so").write_bytes(b"\x7fELF")
            (tree / "build/temp.linux-x86_64-cpython-311").mkdir(parents=True)
            (tree / "build/__native.c").write_text("/* mypyc */\n")
            (tree / "clearip_proxy.egg-info").mkdir()
        app = cdk.App(context=dict(DEFAULT_CONTEXT))
        settings = DeploymentSettings.from_mapping(dict(DEFAULT_CONTEXT))
        stack = ClearIpProxyStack(app, settings.stack_name, settings=settings, source_dir=tree)
        hashes.append(stack.release.asset.asset_hash)
    assert hashes[0] == hashes[1]


# ---- 5. access -------------------------------------------------------------------------------
def test_instance_role(template: Template) -> None:
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": Match.object_like(
                {"Statement": [Match.object_like({"Principal": {"Service": "ec2.amazonaws.com"}})]}
            ),
            "ManagedPolicyArns": [
                {
                    "Fn::Join": [
                        "",
                        ["arn:", {"Ref": "AWS::Partition"}, ":iam::aws:policy/AmazonSSMManagedInstanceCore"],
                    ]
                }
            ],
        },
    )
    statements = Capture()
    template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyName": Match.string_like_regexp("InstanceRole"),
            "PolicyDocument": {"Statement": statements, "Version": Match.any_value()},
        },
    )
    by_sid = {s["Sid"]: s for s in statements.as_array() if "Sid" in s}
    metrics = by_sid["PublishProxyMetrics"]
    assert metrics["Action"] == "cloudwatch:PutMetricData"
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": names.NAMESPACE}}
    asset = by_sid["ReadOwnCodeAsset"]
    assert asset["Action"] == "s3:GetObject"
    resource = json.dumps(asset["Resource"])
    assert "cdk-hnb659fds-assets" in resource and resource.count(".zip") == 1  # one object, not the bucket
    assert by_sid["PutTraces"]["Action"] == "s3:PutObject"
    reads = [s for s in statements.as_array() if "Sid" not in s]
    assert reads and all("ssm:GetParameter" in s["Action"] for s in reads)  # release and settings
    assert set(by_sid) == {
        "PublishProxyMetrics",
        "ReadOwnCodeAsset",
        "PutTraces",
        # infra/logs.py (tests/infra/test_observability.py)
        "ShipProxyLogs",
        "FindSessionLogGroup",
        "PublishHostMetrics",
    }


# ---- 6. alerting -----------------------------------------------------------------------------
def test_topic_enforces_tls_and_email_only_when_set(template: Template, full_template: Template) -> None:
    for tpl in (template, full_template):
        tpl.has_resource_properties(
            "AWS::SNS::TopicPolicy",
            {
                "PolicyDocument": Match.object_like(
                    {
                        "Statement": Match.array_with(
                            [
                                Match.object_like(
                                    {
                                        "Effect": "Deny",
                                        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                                    }
                                )
                            ]
                        )
                    }
                )
            },
        )
    template.resource_count_is("AWS::SNS::Subscription", 0)
    full_template.has_resource_properties(
        "AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "noc@example.net"}
    )


def _alarms(tpl: Template) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in tpl.find_resources("AWS::CloudWatch::Alarm").items()}


def test_every_alarm_is_explicit_and_notifies(template: Template) -> None:
    alarms = _alarms(template)
    assert len(alarms) == 2 * 12
    for alarm in alarms.values():
        props = alarm["Properties"]
        assert props["TreatMissingData"] in ("breaching", "notBreaching", "missing")
        assert props["DatapointsToAlarm"] >= 1
        assert props["AlarmDescription"]
        assert any("Ref" in a for a in props["AlarmActions"])  # the SNS topic
        assert props["OKActions"]


def test_system_status_check_recovers_the_instance(template: Template) -> None:
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": "StatusCheckFailed_System",
            "Namespace": "AWS/EC2",
            "AlarmActions": Match.array_with(
                [{"Fn::Join": ["", Match.array_with([":automate:", ":ec2:recover"])]}]
            ),
        },
    )
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm", {"MetricName": "StatusCheckFailed_Instance", "Namespace": "AWS/EC2"}
    )


def test_heartbeat_missing_breaches(template: Template) -> None:
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": names.HEARTBEAT.name,
            "Namespace": names.NAMESPACE,
            "TreatMissingData": "breaching",
            "ComparisonOperator": "LessThanThreshold",
            # One datapoint per period at the longest metrics_interval the proxy accepts.
            "Period": MAX_METRICS_INTERVAL,
            "Dimensions": [
                {"Name": names.DIMENSION_PROXY_ID, "Value": {"Ref": Match.string_like_regexp("Proxy")}}
            ],
        },
    )


def test_clearip_alarms(template: Template, full_template: Template) -> None:
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": names.CLEARIP_CONNECTED.name,
            "Statistic": "Minimum",
            "Threshold": 1,
            "ComparisonOperator": "LessThanThreshold",
        },
    )
    timeout = names.CLEARIP_OUTCOME_METRICS[names.ClearIpOutcome.TIMEOUT].name
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": timeout,
            "Threshold": AlarmThresholds().clearip_timeouts,
            "ComparisonOperator": "GreaterThanThreshold",
        },
    )
    full_template.has_resource_properties("AWS::CloudWatch::Alarm", {"MetricName": timeout, "Threshold": 25})
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": names.CLEARIP_OUTCOME_METRICS[names.ClearIpOutcome.FORBIDDEN_403].name,
            "Threshold": 0,
            "ComparisonOperator": "GreaterThanThreshold",
        },
    )


def test_failed_call_ratio_uses_math(template: Template) -> None:
    metrics = Capture()
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm", {"Metrics": metrics, "ComparisonOperator": "GreaterThanThreshold"}
    )
    found = {m.get("Id"): m for m in metrics.as_array()}
    expr = next(m["Expression"] for m in found.values() if "Expression" in m)
    assert "failed / calls" in expr
    names_used = {m["MetricStat"]["Metric"]["MetricName"] for m in found.values() if "MetricStat" in m}
    assert names_used == {names.PROXY_FAILED_CALLS.name, names.CALLS.name}


def test_alarm_ids_read_as_sentences(default_stack: ClearIpProxyStack) -> None:
    ids = [a.node.id for a in default_stack.monitoring.alarms]
    assert "Proxy1 heartbeat is missing so the proxy is down or silent" in ids
    assert "Proxy1 gets 403 from ClearIP so its IP is not whitelisted" in ids
    assert all(len(i.split()) >= 4 for i in ids)


def test_alarms_only_use_published_metric_names(template: Template) -> None:
    published = {m.name for m in names.ALL_METRICS}
    for alarm in _alarms(template).values():
        props = alarm["Properties"]
        stats = (
            [props]
            if "MetricName" in props
            else [m["MetricStat"]["Metric"] for m in props["Metrics"] if "MetricStat" in m]
        )
        for s in stats:
            if s["Namespace"] == names.NAMESPACE:
                assert s["MetricName"] in published


# ---- 7. dashboard ----------------------------------------------------------------------------
def _dashboard_body(tpl: Template) -> str:
    (dash,) = tpl.find_resources("AWS::CloudWatch::Dashboard").values()
    return flatten(dash["Properties"]["DashboardBody"])


def test_dashboard_named_after_the_stack(template: Template, full_template: Template) -> None:
    template.has_resource_properties("AWS::CloudWatch::Dashboard", {"DashboardName": "ClearIpProxy"})
    full_template.has_resource_properties("AWS::CloudWatch::Dashboard", {"DashboardName": "SiteB"})


def test_dashboard_widgets(template: Template) -> None:
    body = _dashboard_body(template)
    widgets = json.loads(body)["widgets"]
    text = [w for w in widgets if w["type"] == "text"]
    assert text and "REF-FleetProxy1ElasticIp" in text[0]["properties"]["markdown"]
    assert "REF-FleetProxy2ElasticIp" in text[0]["properties"]["markdown"]
    titles = {w["properties"].get("title") for w in widgets}
    assert "Calls per minute" in titles and "CPU utilisation (%)" in titles
    for spec in (
        names.CALLS,
        names.CLEARIP_LATENCY,
        names.ROUTE_ADVANCES,
        names.HEARTBEAT,
        *(
            names.CLEARIP_OUTCOME_METRICS[names.ClearIpOutcome(o)]
            for o in ("302", "300", "redirect_unusable", "503", "404", "603", "607", "608", "403", "timeout")
        ),
    ):
        assert f'"{spec.name}"' in body, spec.name
    assert '"p50"' in body and '"p99"' in body
    assert '"CPUUtilization"' in body and names.NAMESPACE in body


# ---- 8. outputs ------------------------------------------------------------------------------
def test_outputs(template: Template) -> None:
    outputs = template.to_json()["Outputs"]
    for n in (1, 2):
        assert outputs[f"Proxy{n}PublicIp"]["Value"]["Ref"].startswith(f"FleetProxy{n}ElasticIp")
        assert "Ref" in outputs[f"Proxy{n}InstanceId"]["Value"]
    assert "#dashboards:name=ClearIpProxy" in flatten(outputs["DashboardUrl"]["Value"])
    assert "Ref" in outputs["AlarmTopicArn"]["Value"]
    for key in ("Doctor", "CaptureTrace", "Restart", "SetClearIpTransport", "SetTimeout"):
        assert outputs[f"{key}DocumentName"]["Value"] == f"ClearIpProxy-{key}"
    # How an operator re-applies unchanged settings (docs/DEPLOY.md): run the association now.
    (association,) = template.find_resources(
        "AWS::SSM::Association", {"Properties": {"AssociationName": "ClearIpProxy-RollOut"}}
    )
    # Ref, not Fn::GetAtt: Ref is the association id, and moto's CloudFormation (the deploy tests)
    # fails a template that asks a resource type it does not model for an attribute.
    assert outputs["RollOutAssociationId"]["Value"] == {"Ref": association}


# ---- issue 6.3: operations -------------------------------------------------------------------
def test_trace_bucket(template: Template) -> None:
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            },
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True,
                "BlockPublicPolicy": True,
                "IgnorePublicAcls": True,
                "RestrictPublicBuckets": True,
            },
            "LifecycleConfiguration": {
                "Rules": [Match.object_like({"ExpirationInDays": 14, "Status": "Enabled"})]
            },
        },
    )
    template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "PolicyDocument": Match.object_like(
                {
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                            )
                        ]
                    )
                }
            )
        },
    )


def _documents(tpl: Template) -> dict[str, dict[str, Any]]:
    docs = tpl.find_resources("AWS::SSM::Document")
    return {d["Properties"]["Name"]: d["Properties"] for d in docs.values()}


def _script(props: dict[str, Any]) -> str:
    (step,) = props["Content"]["mainSteps"]
    assert step["action"] == "aws:runShellScript"
    return "\n".join(flatten(line) for line in step["inputs"]["runCommand"])


def test_ssm_documents(template: Template) -> None:
    docs = _documents(template)
    ours = {
        f"ClearIpProxy-{k}"
        for k in ("Doctor", "CaptureTrace", "Restart", "SetClearIpTransport", "SetTimeout", "ApplyRelease")
    }
    # infra/logs.py adds the agent's and the logged session's documents (tests/infra/test_observability.py).
    assert set(docs) == ours | {"ClearIpProxy-CloudWatchAgent", "ClearIpProxy-ProxySession"}
    docs = {k: v for k, v in docs.items() if k in ours}
    for props in docs.values():
        assert props["DocumentType"] == "Command"
        assert props["Content"]["schemaVersion"] == "2.2"
    assert "clearip-proxy doctor --config /etc/clearip-proxy/settings.toml" in _script(
        docs["ClearIpProxy-Doctor"]
    )
    trace = _script(docs["ClearIpProxy-CaptureTrace"])
    assert "clearip-proxy trace --seconds {{ Seconds }} --output" in trace
    assert "aws s3 cp" in trace and "REF-OperationsTraceBucket" in trace
    assert "install -d -m 0750 -o clearip-proxy -g clearip-proxy /var/lib/clearip-proxy/traces" in trace
    assert docs["ClearIpProxy-CaptureTrace"]["Content"]["parameters"]["Seconds"]["default"] == "60"
    assert "systemctl restart clearip-proxy" in _script(docs["ClearIpProxy-Restart"])
    transport = docs["ClearIpProxy-SetClearIpTransport"]
    assert transport["Content"]["parameters"]["Transport"]["allowedValues"] == ["tls", "tcp"]
    script = _script(transport)
    assert (
        "clearip-proxy set clearip_transport {{ Transport }} --config /etc/clearip-proxy/settings.toml"
        in script
    )
    assert "systemctl restart clearip-proxy" in script  # clearip is read when the link is made
    assert "python" not in script and "transport=" not in script  # no copy of the rewrite rule
    timeout = _script(docs["ClearIpProxy-SetTimeout"])
    assert "clearip-proxy set timeout {{ Timeout }} --config /etc/clearip-proxy/settings.toml" in timeout
    assert "systemctl reload clearip-proxy" in timeout and "restart" not in timeout  # reloadable


def test_set_timeout_pattern(template: Template) -> None:
    pattern = _documents(template)["ClearIpProxy-SetTimeout"]["Content"]["parameters"]["Timeout"][
        "allowedPattern"
    ]
    for ok in ("5", "2.5", "60", "0.5", "59.99"):
        assert re.match(pattern, ok), ok
    for bad in ("0", "61", "-1", "5;reboot", "", "100"):
        assert not re.match(pattern, bad), bad


def test_transport_rewrite_in_the_document(template: Template, tmp_path: Any) -> None:
    """Run the document's own command with the proxy's CLI against a settings file."""
    import subprocess
    import sys

    from infra import operations

    cfg = tmp_path / "settings.toml"
    cfg.write_text('clearip = "sip:acme.sip.clearip.com:5061;transport=tls"\n')
    (line,) = [c for c in _documents(template)["ClearIpProxy-SetClearIpTransport"]["Content"]["mainSteps"][0][
        "inputs"]["runCommand"] if "set clearip_transport" in c]  # fmt: skip
    argv = line.replace("{{ Transport }}", "tcp").replace(operations.CONFIG, str(cfg)).split()
    assert argv[0] == operations.CLI
    subprocess.run([sys.executable, "-m", "proxy_runtime", *argv[1:]], check=True, capture_output=True)
    assert 'clearip = "sip:acme.sip.clearip.com:5060;transport=tcp"' in cfg.read_text()


# ---- constructs in isolation ---------------------------------------------------------------
def test_network_construct_exposes_what_it_builds() -> None:
    stack = cdk.Stack(cdk.App(), "Bare")
    net = ProxyNetwork(stack, "Net", sip_cidrs=["203.0.113.0/24"])
    assert isinstance(net.vpc, ec2.Vpc) and len(net.public_subnets) == 2
    Template.from_stack(stack).resource_count_is("AWS::EC2::SecurityGroup", 1)


def test_monitoring_construct_alone() -> None:
    stack = cdk.Stack(cdk.App(), "Bare")
    mon = ProxyMonitoring(
        stack,
        "Mon",
        proxies=[MonitoredProxy(name="P1", instance_id="i-1", public_ip="192.0.2.1")],
        thresholds=AlarmThresholds(),
        alarm_email="ops@example.org",
        dashboard_name="Lab",
    )
    assert len(mon.alarms) == 12 and mon.dashboard_name == "Lab"
    t = Template.from_stack(stack)
    t.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {"MetricName": "Heartbeat", "Dimensions": [{"Name": names.DIMENSION_PROXY_ID, "Value": "i-1"}]},
    )


@pytest.mark.parametrize("bad", [{"sip_cidrs": "10.0.0.1"}, {"sip_cidrs": "10.0.0.0/8", "alarm_email": "x"}])
def test_bad_context_stops_before_synth(bad: dict[str, Any]) -> None:
    from infra.settings import DeploymentSettingsError

    from .conftest import synth_stack

    with pytest.raises(DeploymentSettingsError):
        synth_stack(bad)
