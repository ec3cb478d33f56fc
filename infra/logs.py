"""Every call findable: log groups, the CloudWatch agent, saved Logs Insights queries, session logs.

What runs where:

* On each proxy, ``deploy/clearip-proxy-logs.sh`` (installed by ``deploy/install.sh``) splits the
  proxy's journal into ``/var/log/clearip-proxy/calls.log`` (bare JSON, one line a call) and
  ``proxy.log``; the bootstrap writes ``/var/log/clearip-proxy-bootstrap.log``.
* The CloudWatch agent, the Amazon Linux 2023 package ``amazon-cloudwatch-agent`` from the
  instance's own repository, ships those three files to the log groups below and reports memory
  and disk use. A State Manager association installs the package and loads the agent's
  configuration, which its document carries; the association re-runs when the configuration
  changes and once a day, and reaches a replaced instance by itself, so no user data is involved
  (user data runs only at first boot).
* Session Manager sessions started with this stack's session document are streamed to their own
  log group, so a troubleshooting session leaves a record.

The agent's configuration is built here (:func:`agent_config`) from the same constants the log
groups and alarms use, and validated in a test against the agent's documented JSON schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aws_cdk import Acknowledgment, Aws, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_ssm as ssm
from constructs import Construct

# Files on the instance (deploy/clearip-proxy-logs.sh, infra/user_data.sh write them).
CALLS_FILE = "/var/log/clearip-proxy/calls.log"
PROXY_FILE = "/var/log/clearip-proxy/proxy.log"
BOOTSTRAP_FILE = "/var/log/clearip-proxy-bootstrap.log"

# Host metrics the agent publishes (alarms and the dashboard read them with these names).
HOST_NAMESPACE = "ClearIP/Host"
MEM_USED_PERCENT = "mem_used_percent"
DISK_USED_PERCENT = "disk_used_percent"
HOST_DIMENSION = "InstanceId"
AGENT_CTL = "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl"
AGENT_CONFIG_DIR = "/opt/aws/amazon-cloudwatch-agent/etc"
AGENT_CONFIG_FILE = f"{AGENT_CONFIG_DIR}/clearip-proxy.json"
AGENT_CONFIG_EOF = "CLEARIP_AGENT_CONFIG"


@dataclass(frozen=True, slots=True)
class Retention:
    """Days each log group keeps its events (CloudWatch Logs' allowed values)."""

    calls: logs.RetentionDays = logs.RetentionDays.THREE_MONTHS
    proxy: logs.RetentionDays = logs.RetentionDays.ONE_MONTH
    bootstrap: logs.RetentionDays = logs.RetentionDays.ONE_MONTH
    sessions: logs.RetentionDays = logs.RetentionDays.ONE_YEAR


def log_group_names(stack_name: str) -> dict[str, str]:
    """Log group names by role: one set per stack, so two stacks in a region never collide."""
    return {
        role: f"/clearip-proxy/{stack_name}/{role}" for role in ("calls", "proxy", "bootstrap", "sessions")
    }


def agent_config(groups: Mapping[str, str]) -> dict[str, Any]:
    """The CloudWatch agent's configuration (its JSON file format) for the given log group names.

    * Logs: the three files, one stream per instance (``{instance_id}``); retention is set by the
      stack on the log groups, not by the agent (it would need logs:PutRetentionPolicy).
    * Metrics: memory and root-disk use every 60 s with the instance id; disk also rolled up to the
      instance id alone (``aggregation_dimensions``), so an alarm can name it without the file
      system type and device.
    """
    return {
        "agent": {"metrics_collection_interval": 60, "run_as_user": "root"},
        "logs": {
            "logs_collected": {
                "files": {
                    "collect_list": [
                        {
                            "file_path": CALLS_FILE,
                            "log_group_name": groups["calls"],
                            "log_stream_name": "{instance_id}",
                            "timezone": "UTC",
                        },
                        {
                            "file_path": PROXY_FILE,
                            "log_group_name": groups["proxy"],
                            "log_stream_name": "{instance_id}",
                            "timezone": "UTC",
                        },
                        {
                            "file_path": BOOTSTRAP_FILE,
                            "log_group_name": groups["bootstrap"],
                            "log_stream_name": "{instance_id}",
                            "timezone": "UTC",
                        },
                    ]
                }
            },
            "force_flush_interval": 5,
        },
        "metrics": {
            "namespace": HOST_NAMESPACE,
            "append_dimensions": {HOST_DIMENSION: "${aws:InstanceId}"},
            "aggregation_dimensions": [[HOST_DIMENSION]],
            "metrics_collected": {
                "mem": {"measurement": [MEM_USED_PERCENT], "metrics_collection_interval": 60},
                "disk": {
                    "measurement": ["used_percent"],
                    "resources": ["/"],
                    "drop_device": True,
                    "metrics_collection_interval": 60,
                },
            },
        },
    }


@dataclass(frozen=True, slots=True)
class SavedQuery:
    name: str
    group: str  # role in log_group_names
    query: str


# Logs Insights discovers the JSON fields of calls.log by itself (each line is bare JSON).
# Numbers are masked in the lines (all but the last four digits) unless log_numbers is set, so the
# number search matches on the last digits.
SAVED_QUERIES: tuple[SavedQuery, ...] = (
    SavedQuery(
        "Find a call by Call-ID or number",
        "calls",
        "fields @timestamp, proxy, call_id, outcome, status, reason, carrier, attest, verstat, blocked,"
        " pdd_ms, caller, callee\n"
        "| filter call_id like 'PUT-CALL-ID-OR-LAST-DIGITS-HERE'"
        " or caller like 'PUT-CALL-ID-OR-LAST-DIGITS-HERE' or callee like 'PUT-CALL-ID-OR-LAST-DIGITS-HERE'\n"
        "| sort @timestamp desc\n"
        "| limit 100",
    ),
    SavedQuery(
        "Failed calls in the last hour",
        "calls",
        "fields @timestamp, proxy, call_id, outcome, status, reason, carrier, attempts, advances, pdd_ms\n"
        "| filter status >= 400\n"
        "| sort @timestamp desc\n"
        "| limit 500",
    ),
    SavedQuery(
        "Failed calls by cause",
        "calls",
        "filter status >= 400\n| stats count(*) as calls by status, outcome, reason\n| sort calls desc",
    ),
    SavedQuery(
        "Slowest post-dial delays",
        "calls",
        "fields @timestamp, proxy, call_id, pdd_ms, clearip_ms, attempts, advances, carrier, status, reason\n"
        "| filter pdd_ms > 0\n"
        "| sort pdd_ms desc\n"
        "| limit 50",
    ),
    SavedQuery(
        "Calls by attestation",
        "calls",
        "filter outcome = '302'\n| stats count(*) as calls by attest, verstat\n| sort calls desc",
    ),
    SavedQuery(
        "Blocked calls",
        "calls",
        "fields @timestamp, proxy, call_id, status, blocked, outcome, reason\n"
        "| filter status in [603, 607, 608]\n"
        "| sort @timestamp desc\n"
        "| limit 200",
    ),
    SavedQuery(
        "Proxy errors and warnings",
        "proxy",
        "fields @timestamp, @logStream, @message\n"
        "| filter @message like / (ERROR|WARNING|CRITICAL) /\n"
        "| sort @timestamp desc\n"
        "| limit 200",
    ),
)


class ProxyLogs(Construct):
    """Log groups, the agent's configuration and its association, saved queries, session logging.

    Exposes ``log_groups`` (by role), ``agent_config`` (the dict), ``agent_document``,
    ``agent_association``, ``queries`` and ``session_document_name``; :meth:`grant_to` gives an
    instance role what the agent and Session Manager need to write.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        instance_ids: Sequence[str],
        retention: Retention | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        retention = retention or Retention()
        names = log_group_names(stack.stack_name)
        days = {
            "calls": retention.calls,
            "proxy": retention.proxy,
            "bootstrap": retention.bootstrap,
            "sessions": retention.sessions,
        }
        # Destroyed with the stack: the names are the stack's, so a rebuilt stack of the same name
        # must be able to create them again. Export (or raise retention) to keep records longer.
        self.log_groups: dict[str, logs.LogGroup] = {
            role: logs.LogGroup(
                self,
                f"{role.capitalize()}LogGroup",
                log_group_name=name,
                retention=days[role],
                removal_policy=RemovalPolicy.DESTROY,
            )
            for role, name in names.items()
        }

        self.agent_config = agent_config(names)
        # The configuration travels in the document (one line of JSON in a quoted here-document):
        # a change makes a new document version, which the association runs at once.
        rendered = json.dumps(self.agent_config, sort_keys=True, separators=(",", ":"))
        if "{{" in rendered or AGENT_CONFIG_EOF in rendered:
            raise ValueError("the agent configuration cannot be embedded in an SSM document")
        self.agent_document = ssm.CfnDocument(
            self,
            "AgentDocument",
            name=f"{stack.stack_name}-CloudWatchAgent",
            document_type="Command",
            document_format="JSON",
            target_type="/AWS::EC2::Instance",
            update_method="NewVersion",
            content={
                "schemaVersion": "2.2",
                "description": "Install the CloudWatch agent from the instance's package repository "
                "and load the ClearIP proxy's configuration into it (infra/logs.py).",
                "parameters": {
                    "ConfigHash": {
                        "type": "String",
                        "default": "",
                        "description": "SHA-256 of the configuration: a new value re-runs the association",
                    },
                },
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": "InstallAndConfigure",
                        "inputs": {
                            "timeoutSeconds": "600",
                            "runCommand": [
                                "set -eu",
                                "rpm -q amazon-cloudwatch-agent >/dev/null 2>&1"
                                " || dnf install -y -q amazon-cloudwatch-agent",
                                f"install -d -m 0755 {AGENT_CONFIG_DIR}",
                                f"cat >{AGENT_CONFIG_FILE} <<'{AGENT_CONFIG_EOF}'",
                                rendered,
                                AGENT_CONFIG_EOF,
                                f"{AGENT_CTL} -a fetch-config -m ec2 -s -c file:{AGENT_CONFIG_FILE}",
                                f"{AGENT_CTL} -a status",
                            ],
                        },
                    }
                ],
            },
        )
        self.agent_association = ssm.CfnAssociation(
            self,
            "AgentAssociation",
            name=self.agent_document.ref,
            association_name=f"{stack.stack_name}-CloudWatchAgent",
            targets=[ssm.CfnAssociation.TargetProperty(key="InstanceIds", values=list(instance_ids))],
            document_version="$LATEST",
            parameters={"ConfigHash": [hashlib.sha256(rendered.encode()).hexdigest()]},
            # Daily, so an agent removed or reconfigured by hand comes back; at once on any change.
            schedule_expression="rate(1 day)",
            apply_only_at_cron_interval=False,
            # One proxy at a time (the agent restarts; calls are untouched either way), and a
            # failure on one proxy does not keep the other from being configured.
            max_concurrency="1",
            max_errors="100%",
            compliance_severity="MEDIUM",
        )

        self.queries: dict[str, logs.CfnQueryDefinition] = {}
        for i, q in enumerate(SAVED_QUERIES):
            self.queries[q.name] = logs.CfnQueryDefinition(
                self,
                f"Query{i}",
                name=f"ClearIP/{stack.stack_name}/{q.name}",
                query_string=q.query,
                log_group_names=[self.log_groups[q.group].log_group_name],
            )

        # Session Manager: a stack-owned session document (the account-wide SSM-SessionManagerRunShell
        # may already exist and belongs to the account, not to this stack). Start sessions with
        # `aws ssm start-session --target i-... --document-name <stack>-ProxySession`.
        self.session_document_name = f"{stack.stack_name}-ProxySession"
        self.session_document = ssm.CfnDocument(
            self,
            "SessionDocument",
            name=self.session_document_name,
            document_type="Session",
            document_format="JSON",
            update_method="NewVersion",
            content={
                "schemaVersion": "1.0",
                "description": "Shell session on a ClearIP proxy, streamed to CloudWatch Logs",
                "sessionType": "Standard_Stream",
                "inputs": {
                    "cloudWatchLogGroupName": self.log_groups["sessions"].log_group_name,
                    # CloudWatch Logs encrypts every log group at rest; this flag asks for a
                    # customer-managed KMS key on the group, which this stack does not create.
                    "cloudWatchEncryptionEnabled": False,
                    "cloudWatchStreamingEnabled": True,
                    "idleSessionTimeout": "20",
                    "maxSessionDuration": "120",
                    "runAsEnabled": False,
                    "shellProfile": {
                        "linux": "echo 'This session is recorded in CloudWatch Logs. Start with: "
                        "sudo /opt/clearip-proxy/venv/bin/clearip-proxy doctor --config "
                        "/etc/clearip-proxy/settings.toml'",
                    },
                },
            },
        )

    def grant_to(self, role: iam.Role) -> None:
        """What the agent and Session Manager on the proxies need: write their log groups and
        publish host metrics in their own namespace."""
        groups = list(self.log_groups.values())
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ShipProxyLogs",
                actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[g.log_group_arn for g in groups],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                # The SSM agent checks the session log group (and its encryption) before streaming.
                sid="FindSessionLogGroup",
                actions=["logs:DescribeLogGroups"],
                resources=[f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*"],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="PublishHostMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": HOST_NAMESPACE}},
            )
        )
        Validations.of(role).acknowledge(
            Acknowledgment(
                id="AwsSolutions::AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:logs:<AWS::Region>:"
                "<AWS::AccountId>:log-group:*]",
                reason="logs:DescribeLogGroups is a list action without resource-level scoping beyond "
                "the account and region; the SSM agent needs it to stream session logs.",
            ),
        )
