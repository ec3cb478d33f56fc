"""Run Command documents for operating the proxies through Session Manager, and the trace bucket.

Each document is one command an on-call engineer runs against one proxy or all of them
(``aws ssm send-command --document-name <stack>-Doctor --targets ...``); docs/DEPLOY.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aws_cdk import Acknowledgment, Duration, RemovalPolicy, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_ssm as ssm
from constructs import Construct

CONFIG = "/etc/clearip-proxy/settings.toml"
CLI = "/opt/clearip-proxy/venv/bin/clearip-proxy"
TRACE_DIR = "/var/lib/clearip-proxy/traces"
TRACE_PREFIX = "traces"


@dataclass(frozen=True, slots=True)
class DocumentSpec:
    key: str
    description: str
    parameters: dict[str, Any]
    commands: list[str]
    timeout_seconds: int = 600


def _restart_and_check() -> list[str]:
    return [
        "systemctl restart clearip-proxy",
        "sleep 3",
        "systemctl is-active clearip-proxy",
    ]


def _reload_and_check() -> list[str]:
    # SIGHUP: the proxy re-reads the file and applies reloadable settings without dropping a call.
    return [
        "systemctl reload clearip-proxy",
        "sleep 1",
        "systemctl is-active clearip-proxy",
    ]


def document_specs(bucket_name: str) -> list[DocumentSpec]:
    """The documents' content; ``bucket_name`` may be a CDK token."""
    return [
        DocumentSpec(
            key="Doctor",
            description="Run `clearip-proxy doctor`: settings, listeners, ClearIP connection, TLS, DNS, "
            "carrier reachability, advertised address, clock offset. Fails when something is wrong.",
            parameters={
                "Carriers": {
                    "type": "String",
                    "default": "",
                    "description": "Optional carrier addresses host:port to test TCP reachability of, "
                    "space separated",
                    "allowedPattern": r"^[A-Za-z0-9.:\[\] -]*$",
                },
            },
            commands=[
                "set -eu",
                "set --",
                'for c in {{ Carriers }}; do set -- "$@" --carrier "$c"; done',
                f'{CLI} doctor --config {CONFIG} "$@"',
            ],
        ),
        DocumentSpec(
            key="CaptureTrace",
            description="Capture the proxy's SIP trace (decrypted TLS included, numbers masked unless "
            "log_numbers is set) for N seconds and upload it to the stack's trace bucket.",
            parameters={
                "Seconds": {
                    "type": "String",
                    "default": "60",
                    "description": "How long to capture, 1 to 3600 seconds",
                    "allowedPattern": r"^([1-9][0-9]{0,2}|[1-2][0-9]{3}|3[0-5][0-9]{2}|3600)$",
                },
            },
            commands=[
                "set -eu",
                "ID=$(cat /var/lib/cloud/data/instance-id 2>/dev/null || hostname)",
                "FILE=" + TRACE_DIR + '/"$ID-$(date -u +%Y%m%dT%H%M%SZ)".pcap',
                # The proxy itself writes the trace, so its user must own the directory.
                f"install -d -m 0750 -o clearip-proxy -g clearip-proxy {TRACE_DIR}",
                f'{CLI} trace --seconds {{{{ Seconds }}}} --output "$FILE"',
                'for f in "$FILE"*; do',
                '  KEY="' + TRACE_PREFIX + '/$ID/$(basename "$f")"',
                f'  aws s3 cp --only-show-errors "$f" "s3://{bucket_name}/$KEY"',
                f'  echo "trace uploaded: s3://{bucket_name}/$KEY"',
                '  rm -f "$f"',
                "done",
            ],
            timeout_seconds=3900,
        ),
        DocumentSpec(
            key="Restart",
            description=(
                "Restart the proxy (SIGTERM drains calls in flight for up to drain_timeout, 30 s by "
                "default, first)."
            ),
            parameters={},
            commands=["set -eu", *_restart_and_check()],
        ),
        DocumentSpec(
            key="SetClearIpTransport",
            description="Switch the connection to ClearIP to TLS (5061) or TCP (5060, readable traces), "
            "persist it in the settings file and restart the proxy.",
            parameters={
                "Transport": {
                    "type": "String",
                    "allowedValues": ["tls", "tcp"],
                    "description": "tls (default, encrypted) or tcp (plain, for readable packet captures)",
                },
            },
            commands=[
                "set -eu",
                # The installed CLI rewrites the URI (the one copy of the rule, proxy_runtime.settings).
                f"{CLI} set clearip_transport {{{{ Transport }}}} --config {CONFIG}",
                *_restart_and_check(),
            ],
        ),
        DocumentSpec(
            key="SetTimeout",
            description="Change how long the proxy waits for ClearIP (and for a carrier's first "
            "response) before the switch is told to route-advance; persist it and reload (no call is "
            "dropped). It stays until the release association runs again (a deploy that changes the "
            "settings or the release): change the site's settings file too.",
            parameters={
                "Timeout": {
                    "type": "String",
                    "description": "Seconds, greater than 0 and at most 60 (e.g. 5 or 2.5)",
                    "allowedPattern": r"^([1-9]|[1-5][0-9]|60|[0-9]\.[0-9]{1,2}|[1-5][0-9]\.[0-9]{1,2})$",
                },
            },
            commands=[
                "set -eu",
                f"{CLI} set timeout {{{{ Timeout }}}} --config {CONFIG}",
                *_reload_and_check(),
            ],
        ),
    ]


class ProxyOperations(Construct):
    """The trace bucket (written only by the proxies' role) and one Command document per operation."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        instance_role: iam.IRole,
        trace_retention_days: int = 14,
        document_prefix: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        trace_retention = Duration.days(trace_retention_days)
        prefix = document_prefix or Stack.of(self).stack_name
        self.trace_bucket = s3.Bucket(
            self,
            "TraceBucket",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireTraces",
                    expiration=trace_retention,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            # Traces are evidence in an open ticket: keep the bucket when the stack goes.
            removal_policy=RemovalPolicy.RETAIN,
        )
        # The proxies may only add traces under their prefix: no read, list or delete.
        instance_role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="PutTraces",
                actions=["s3:PutObject"],
                resources=[self.trace_bucket.arn_for_objects(f"{TRACE_PREFIX}/*")],
            )
        )
        Validations.of(self.trace_bucket).acknowledge(
            Acknowledgment(
                id="AwsSolutions::AwsSolutions-S1",
                reason=f"Short-lived diagnostic traces (expire after {trace_retention.to_days()} days) "
                f"written only by the proxies' role under {TRACE_PREFIX}/; an access-log bucket would "
                "itself need logging. Enable CloudTrail S3 data events where reads must be audited.",
            )
        )
        stack = Stack.of(self)
        bucket_logical_id = stack.resolve(stack.get_logical_id(self._bucket_cfn()))
        Validations.of(instance_role).acknowledge(
            Acknowledgment(
                id=f"AwsSolutions::AwsSolutions-IAM5[Resource::<{bucket_logical_id}.Arn>/{TRACE_PREFIX}/*]",
                reason="Trace object names are made at capture time (instance id and timestamp); the "
                f"proxies may only put objects under {TRACE_PREFIX}/ of the stack's trace bucket.",
            )
        )

        self.documents: dict[str, ssm.CfnDocument] = {}
        self.document_names: dict[str, str] = {}
        for spec in document_specs(self.trace_bucket.bucket_name):
            name = f"{prefix}-{spec.key}"
            content: dict[str, Any] = {
                "schemaVersion": "2.2",
                "description": spec.description,
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": spec.key,
                        "precondition": {"StringEquals": ["platformType", "Linux"]},
                        "inputs": {"timeoutSeconds": str(spec.timeout_seconds), "runCommand": spec.commands},
                    }
                ],
            }
            if spec.parameters:
                content["parameters"] = spec.parameters
            doc = ssm.CfnDocument(
                self,
                f"{spec.key}Document",
                name=name,
                document_type="Command",
                document_format="JSON",
                target_type="/AWS::EC2::Instance",
                update_method="NewVersion",
                content=content,
            )
            self.documents[spec.key] = doc
            self.document_names[spec.key] = name

    def _bucket_cfn(self) -> s3.CfnBucket:
        cfn = self.trace_bucket.node.default_child
        assert isinstance(cfn, s3.CfnBucket)
        return cfn
