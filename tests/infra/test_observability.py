"""Issue 13, the operator's view in the stack: the CloudWatch agent (configuration validated against
its documented schema), log groups with retention, saved Logs Insights queries, logged Session
Manager sessions, the alarms that say what hurts calls, and a dashboard that tells the story."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aws_cdk.assertions import Capture, Match, Template

from infra import dashboard, logs
from infra.stack import ClearIpProxyStack
from proxy_runtime.__main__ import LOG_FORMAT
from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import CallRecord

from .conftest import REPO, flatten, resources

SCHEMA = REPO / "tests" / "data" / "cloudwatch-agent-config.schema.json"
EXPORTER = REPO / "deploy" / "clearip-proxy-logs.sh"
STACK = "ClearIpProxy"


def _validate(config: dict[str, Any], schema_file: Path = SCHEMA) -> None:
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema).validate(config)


# ---- the agent ---------------------------------------------------------------------------------
def test_agent_config_is_valid_against_the_documented_schema() -> None:
    _validate(logs.agent_config(logs.log_group_names(STACK)))


def test_agent_schema_rejects_what_the_agent_would_ignore_or_refuse() -> None:
    good = logs.agent_config(logs.log_group_names(STACK))
    bad_key = json.loads(json.dumps(good))
    bad_key["logs"]["logs_collected"]["files"]["collect_list"][0]["log_group"] = "x"  # misspelt
    bad_retention = json.loads(json.dumps(good))
    bad_retention["logs"]["logs_collected"]["files"]["collect_list"][0]["retention_in_days"] = 45
    bad_dimension = json.loads(json.dumps(good))
    bad_dimension["metrics"]["append_dimensions"]["InstanceId"] = "{instance_id}"
    no_measurement = json.loads(json.dumps(good))
    del no_measurement["metrics"]["metrics_collected"]["mem"]["measurement"]
    for bad in (bad_key, bad_retention, bad_dimension, no_measurement):
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)


@pytest.mark.skipif(
    not os.environ.get("CLOUDWATCH_AGENT_SCHEMA"),
    reason="set CLOUDWATCH_AGENT_SCHEMA to the agent's own schema file "
    "(/opt/aws/amazon-cloudwatch-agent/doc/amazon-cloudwatch-agent-schema.json on an instance)",
)
def test_agent_config_is_valid_against_the_agents_own_schema() -> None:
    _validate(logs.agent_config(logs.log_group_names(STACK)), Path(os.environ["CLOUDWATCH_AGENT_SCHEMA"]))


def _agent_script(template: Template) -> list[str]:
    docs = {
        d["Properties"]["Name"]: d["Properties"]
        for d in resources(template.to_json(), "AWS::SSM::Document").values()
    }
    return list(docs[f"{STACK}-CloudWatchAgent"]["Content"]["mainSteps"][0]["inputs"]["runCommand"])


def _shipped_config(template: Template) -> dict[str, Any]:
    """The configuration the agent's document writes, run through bash as the instance would."""
    script = "\n".join(_agent_script(template))
    start = script.index(f"<<'{logs.AGENT_CONFIG_EOF}'")
    body = script[script.index("\n", start) + 1 : script.index(f"\n{logs.AGENT_CONFIG_EOF}\n")]
    heredoc = f"cat <<'{logs.AGENT_CONFIG_EOF}'\n{body}\n{logs.AGENT_CONFIG_EOF}\n"
    out = subprocess.run(["bash", "-c", heredoc], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def test_agent_config_in_the_stack_ships_the_three_files_to_the_stacks_log_groups(
    template: Template, default_stack: ClearIpProxyStack
) -> None:
    config = _shipped_config(template)
    _validate(config)
    assert config == default_stack.logs.agent_config
    files = {
        f["file_path"]: f["log_group_name"] for f in config["logs"]["logs_collected"]["files"]["collect_list"]
    }
    assert files == {
        "/var/log/clearip-proxy/calls.log": f"/clearip-proxy/{STACK}/calls",
        "/var/log/clearip-proxy/proxy.log": f"/clearip-proxy/{STACK}/proxy",
        "/var/log/clearip-proxy-bootstrap.log": f"/clearip-proxy/{STACK}/bootstrap",
    }
    # The paths are the ones the exporter, logrotate and the bootstrap write.
    exporter = EXPORTER.read_text()
    assert "LOG_DIR=/var/log/clearip-proxy" in exporter and '"$dir/calls.log"' in exporter
    rotate = (REPO / "deploy" / "clearip-proxy.logrotate").read_text()
    assert logs.CALLS_FILE in rotate and logs.PROXY_FILE in rotate
    assert f"exec >>{logs.BOOTSTRAP_FILE}" in (REPO / "infra" / "user_data.sh").read_text()
    metrics = config["metrics"]
    assert metrics["namespace"] == logs.HOST_NAMESPACE
    assert metrics["append_dimensions"] == {"InstanceId": "${aws:InstanceId}"}
    assert metrics["aggregation_dimensions"] == [["InstanceId"]]
    assert set(metrics["metrics_collected"]) == {"mem", "disk"}


def test_agent_installed_from_the_package_repository_and_configured_by_state_manager(
    template: Template,
) -> None:
    tpl = template.to_json()
    script = "\n".join(_agent_script(template))
    assert "dnf install -y -q amazon-cloudwatch-agent" in script
    assert f"{logs.AGENT_CTL} -a fetch-config -m ec2 -s -c file:{logs.AGENT_CONFIG_FILE}" in script
    assert "{{" not in script  # nothing in the configuration reads as an SSM parameter
    subprocess.run(["bash", "-n", "-c", script], check=True)
    instances = sorted(resources(tpl, "AWS::EC2::Instance"))
    template.has_resource_properties(
        "AWS::SSM::Association",
        {
            "Name": {"Ref": Match.string_like_regexp("LogsAgentDocument")},
            "Targets": [{"Key": "InstanceIds", "Values": [{"Ref": i} for i in instances]}],
            "DocumentVersion": "$LATEST",
            "Parameters": {"ConfigHash": [Match.string_like_regexp("^[0-9a-f]{64}$")]},
            "ScheduleExpression": "rate(1 day)",
            "MaxConcurrency": "1",
            "MaxErrors": "100%",
        },
    )


def test_instance_role_may_ship_logs_and_host_metrics(template: Template) -> None:
    statements = Capture()
    template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyName": Match.string_like_regexp("InstanceRole"),
            "PolicyDocument": {"Statement": statements, "Version": Match.any_value()},
        },
    )
    by_sid = {s["Sid"]: s for s in statements.as_array() if "Sid" in s}
    ship = by_sid["ShipProxyLogs"]
    assert set(ship["Action"]) == {"logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"}
    arns = {r["Fn::GetAtt"][0] for r in ship["Resource"]}
    assert {re.sub(r"[0-9A-F]{8}$", "", a) for a in arns} == {
        f"Logs{r.capitalize()}LogGroup" for r in ("calls", "proxy", "bootstrap", "sessions")
    }
    host = by_sid["PublishHostMetrics"]
    assert host["Condition"] == {"StringEquals": {"cloudwatch:namespace": logs.HOST_NAMESPACE}}


# ---- log groups, queries, sessions -------------------------------------------------------------
def test_log_groups_with_retention(template: Template) -> None:
    for role, days in (("calls", 90), ("proxy", 30), ("bootstrap", 30), ("sessions", 365)):
        template.has_resource(
            "AWS::Logs::LogGroup",
            {
                "Properties": {"LogGroupName": f"/clearip-proxy/{STACK}/{role}", "RetentionInDays": days},
                "DeletionPolicy": "Delete",
            },
        )
    template.resource_count_is("AWS::Logs::LogGroup", 4 + 1)  # + the VPC flow logs' group


def _call_line_fields() -> set[str]:
    rec = CallRecord("c", None, None, 0, 0, 200, 1.0, False, False)
    return set(json.loads(MetricsRecorder(proxy_id="p").call_line(rec)))


def test_saved_queries(template: Template) -> None:
    found = {
        q["Properties"]["Name"]: q["Properties"]
        for q in resources(template.to_json(), "AWS::Logs::QueryDefinition").values()
    }
    prefix = f"ClearIP/{STACK}/"
    for name in (
        "Find a call by Call-ID or number",
        "Failed calls in the last hour",
        "Slowest post-dial delays",
        "Calls by attestation",
    ):
        assert prefix + name in found, sorted(found)
    fields = _call_line_fields()
    for name, props in found.items():
        group = props["LogGroupNames"][0]["Ref"]
        query = props["QueryString"]
        if "errors" in name:
            assert group.startswith("LogsProxyLogGroup")
            continue
        assert group.startswith("LogsCallsLogGroup"), name
        # Every field a call query names is a key of the per-call JSON line.
        used = set(re.findall(r"(?<![@\w])([a-z_]+)\b(?=\s*(?:,|\n|$| like| >=| =| desc|\)))", query))
        used -= {"calls", "desc", "asc", "limit", "count"}
        assert used <= fields, (name, used - fields)
    assert "sort pdd_ms desc" in found[prefix + "Slowest post-dial delays"]["QueryString"]
    assert "by attest" in found[prefix + "Calls by attestation"]["QueryString"]
    assert "status >= 400" in found[prefix + "Failed calls in the last hour"]["QueryString"]


def test_session_manager_sessions_are_logged(template: Template) -> None:
    template.has_resource_properties(
        "AWS::SSM::Document",
        {
            "Name": f"{STACK}-ProxySession",
            "DocumentType": "Session",
            "Content": Match.object_like(
                {
                    "sessionType": "Standard_Stream",
                    "inputs": Match.object_like(
                        {
                            "cloudWatchLogGroupName": {
                                "Ref": Match.string_like_regexp("LogsSessionsLogGroup")
                            },
                            "cloudWatchStreamingEnabled": True,
                        }
                    ),
                }
            ),
        },
    )
    outputs = template.to_json()["Outputs"]
    assert outputs["SessionDocumentName"]["Value"] == f"{STACK}-ProxySession"


# ---- the exporter and its installation ----------------------------------------------------------
def test_exporter_splits_call_lines_into_bare_json(tmp_path: Path) -> None:
    rec = MetricsRecorder(proxy_id="i-0abc")
    line = rec.call_line(CallRecord("a84b@10.0.0.5", None, None, 0, 0, 503, 4.0, False, True, reason="x"))
    fmt = logging.Formatter(LOG_FORMAT)  # as the proxy logs

    def out(name: str, level: int, msg: str) -> str:
        return fmt.format(logging.LogRecord(name, level, __file__, 1, msg, None, None))

    journal = "\n".join(
        [
            out("clearip.proxy", logging.INFO, "listening on udp 0.0.0.0:5060"),
            out("clearip.calls", logging.INFO, line),
            out("clearip.proxy", logging.ERROR, "ClearIP answered 403 Forbidden"),
            out("clearip.calls", logging.INFO, line),
        ]
    )
    subprocess.run(
        ["bash", str(EXPORTER), "--split", str(tmp_path)], input=journal + "\n", text=True, check=True
    )
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [line, line] and json.loads(calls[0])["call_id"] == "a84b@10.0.0.5"
    proxy = (tmp_path / "proxy.log").read_text().splitlines()
    assert len(proxy) == 2 and "listening" in proxy[0] and "403" in proxy[1]


def test_install_sh_installs_the_exporter_unit_and_rotation(tmp_path: Path) -> None:
    root = tmp_path / "root"
    args = ["--root", str(root), "--skip-venv", "--allow", "203.0.113.10/32", "--proxy-id", "i-1"]
    subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), *args], check=True, capture_output=True)
    unit = (root / "etc/systemd/system/clearip-proxy-logs.service").read_text()
    assert "ExecStart=/opt/clearip-proxy/src/deploy/clearip-proxy-logs.sh" in unit
    assert (root / "opt/clearip-proxy/src/deploy/clearip-proxy-logs.sh").stat().st_mode & 0o111
    assert (root / "etc/logrotate.d/clearip-proxy").read_text() == (
        REPO / "deploy" / "clearip-proxy.logrotate"
    ).read_text()
    again = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), *args], check=True, capture_output=True, text=True
    )
    assert "unchanged" in again.stdout
    subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--uninstall", "--root", str(root)], check=True
    )
    assert not (root / "etc/systemd/system/clearip-proxy-logs.service").exists()
    assert not (root / "etc/logrotate.d/clearip-proxy").exists()


# ---- alarms ------------------------------------------------------------------------------------
def test_untrusted_traffic_alarm(template: Template) -> None:
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": names.UNTRUSTED_DROPPED.name,
            "Namespace": names.NAMESPACE,
            "Statistic": "Sum",
            "Period": 300,
            "Threshold": 0,
            "ComparisonOperator": "GreaterThanThreshold",
            "TreatMissingData": "notBreaching",
        },
    )
    descriptions = [
        flatten(a["Properties"]["AlarmDescription"])
        for a in resources(template.to_json(), "AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == names.UNTRUSTED_DROPPED.name
    ]
    assert len(descriptions) == 2 and all("sip_cidrs" in d for d in descriptions)


def test_carriers_failing_alarm_is_a_ratio(template: Template) -> None:
    metrics = Capture()
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Metrics": metrics,
            "Threshold": 20,
            "EvaluationPeriods": 2,
            "TreatMissingData": "notBreaching",
            "AlarmName": Match.string_like_regexp("^ClearIpProxy Proxy. sees every carrier fail"),
        },
    )
    found = {m["Id"]: m for m in metrics.as_array()}
    assert "100 * failed / routed" in next(m["Expression"] for m in found.values() if "Expression" in m)
    stats = {
        m["MetricStat"]["Metric"]["MetricName"]: m["MetricStat"]["Stat"]
        for m in found.values()
        if "MetricStat" in m
    }
    assert stats == {names.CARRIERS_FAILED_CALLS.name: "Sum", names.CARRIER_ATTEMPTS.name: "SampleCount"}


def test_host_and_brownout_alarms(template: Template) -> None:
    for metric, stat in ((logs.MEM_USED_PERCENT, "Average"), (logs.DISK_USED_PERCENT, "Maximum")):
        template.has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {
                "Namespace": logs.HOST_NAMESPACE,
                "MetricName": metric,
                "Statistic": stat,
                "Dimensions": [{"Name": "InstanceId", "Value": {"Ref": Match.string_like_regexp("Proxy")}}],
                "TreatMissingData": "missing",
                "ComparisonOperator": "GreaterThanThreshold",
            },
        )
    template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": "ClearIpBreakerOpen",
            "Namespace": names.NAMESPACE,
            "Statistic": "Maximum",
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
        },
    )


def test_new_alarm_ids_read_as_sentences(default_stack: ClearIpProxyStack) -> None:
    ids = {a.node.id for a in default_stack.monitoring.alarms}
    for n in ("Proxy1", "Proxy2"):
        assert {
            f"{n} drops SIP from sources it does not trust",
            f"{n} sees every carrier fail on more than 20 percent of routed calls",
            f"{n} has its ClearIP breaker open so calls get 503 at once",
            f"{n} memory use is above 90 percent",
            f"{n} disk use is above 85 percent",
        } <= ids


# ---- the dashboard -----------------------------------------------------------------------------
def _body(tpl: Template) -> dict[str, Any]:
    (dash,) = tpl.find_resources("AWS::CloudWatch::Dashboard").values()
    return dict(json.loads(flatten(dash["Properties"]["DashboardBody"])))


def test_alarm_status_widget_on_top_with_every_alarm(template: Template) -> None:
    widgets = _body(template)["widgets"]
    top = min(widgets, key=lambda w: (w["y"], w["x"]))
    assert top["type"] == "alarm" and top["width"] == 24
    assert len(top["properties"]["alarms"]) == len(resources(template.to_json(), "AWS::CloudWatch::Alarm"))


def test_dashboard_tells_the_story(template: Template) -> None:
    body = _body(template)
    titles = [w["properties"].get("title", "") for w in body["widgets"]]
    text = json.dumps(body)
    for spec in (
        names.CALLS,
        names.POST_DIAL_DELAY,
        *names.STIR_ATTESTATION_METRICS.values(),
        *names.STIR_VERSTAT_METRICS.values(),
        *names.BLOCKED_METRICS.values(),
        names.CARRIERS_FAILED_CALLS,
        names.ROUTE_ADVANCES,
        names.UNTRUSTED_DROPPED,
        names.CLEARIP_CONNECTED,
        names.CLEARIP_BREAKER_OPEN,
        names.CLEARIP_LATENCY,
    ):
        assert f'"{spec.name}"' in text, spec.name
    assert f'"{logs.MEM_USED_PERCENT}"' in text and f'"{logs.DISK_USED_PERCENT}"' in text
    for words in (
        "attestation",
        "verstat",
        "Blocked",
        "carriers failing",
        "dropped",
        "ClearIP reachable",
        "Host",
    ):
        assert any(words.lower() in t.lower() for t in titles), words
    assert '"p50"' in text and '"p99"' in text


def test_metrics_doc_shows_the_dashboard(template: Template) -> None:
    (dash,) = template.find_resources("AWS::CloudWatch::Dashboard").values()
    rendered = dashboard.render_markdown(dash["Properties"]["DashboardBody"])
    assert rendered in (REPO / "docs" / "METRICS.md").read_text(), "regenerate: python -m infra.dashboard"


def test_cost_counts_every_published_metric() -> None:
    """docs/METRICS.md prices the metrics the proxy publishes: its count must follow names.py."""
    doc = (REPO / "docs" / "METRICS.md").read_text()
    n = len(names.ALL_METRICS)
    times = "\u00d7"  # the multiplication sign, as the document writes it
    row = f"| Proxy metrics | {n} names {times} 2 proxies (one dimension each) | ${n * 2 * 0.30:.2f} |"
    assert row in doc


def test_the_documented_regeneration_command_runs(tmp_path: Path) -> None:
    """`python -m infra.dashboard` (the command METRICS.md's marker names) needs no site.toml and
    prints exactly the section docs/METRICS.md holds."""
    proc = subprocess.run(
        [sys.executable, "-m", "infra.dashboard"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dashboard.DOC_BEGIN in (REPO / "docs" / "METRICS.md").read_text()
    assert proc.stdout.strip() in (REPO / "docs" / "METRICS.md").read_text()
