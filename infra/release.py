"""The proxy release and the site's settings, and how every later `cdk deploy` brings them to the proxies.

User data runs only at an instance's first boot, so it cannot carry a later change. Instead:

- the code asset (the runtime, deploy/ and the hash-pinned wheels) and the site's settings file
  (rendered and validated by the proxy's own settings code at synth) are published as two SSM
  parameters, which a proxy reads at first boot (so a replaced or auto-healed proxy comes back with
  the current release and settings);
- one State Manager association runs the ``<stack>-ApplyRelease`` document on the proxies with
  ``MaxConcurrency=1`` and ``MaxErrors=0``. Its parameters carry the asset's URL and hash and the
  settings, so a deploy that changes either updates the association, and SSM runs the update on
  one proxy at a time, stopping at the first that fails. ``WaitForSuccessTimeoutSeconds`` makes
  CloudFormation wait for the roll-out: a proxy that does not come up fails the deploy (which rolls
  the association back, re-applying the previous release the same way).

The on-instance step is deploy/install.sh of the new release, the same script as the first boot:
it keeps the host's own settings (Elastic IP, instance id, certificate), lets the proxy's settings
code say whether the change needs a reload (SIGHUP, no call dropped) or a drained restart (a new
release or a restart-only setting), applies it, and waits until the proxy listens again.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from aws_cdk import Aws, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_ssm as ssm
from constructs import Construct

REPO_ROOT = Path(__file__).resolve().parents[1]

# The asset is the runtime only: everything is excluded, then the runtime is let back in. setup.py and
# requirements-build.lock let each instance compile the core (deploy/install.sh); no compiled module
# (*.so) ever travels, so a synth on any machine gives the same asset and the same asset hash.
ASSET_EXCLUDE: tuple[str, ...] = (
    "*",
    ".*",
    "!proxy_runtime",
    "!proxy_runtime/**",
    "!deploy",
    "!deploy/**",
    "!pyproject.toml",
    "!setup.py",
    "!requirements-runtime.txt",
    "!requirements-runtime.lock",
    "!requirements-build.lock",
    "!wheels",
    "!wheels/**",
    "**/__pycache__",
    "**/*.pyc",
    "**/*.so",
    "**/.*",
)
INSTALL_TIMEOUT_SECONDS = 900
"""One proxy's update: download, offline install with the core's compile (about 75 s on one busy core
here, allow 3x on a small instance), drained restart (up to 45 s), readiness wait (120 s)."""


def apply_release_commands() -> list[str]:
    """The on-instance update (Run Command, as root): fetch the release, run its install.sh.

    Without ``--no-packages``: install.sh installs only OS packages that are missing, and the first
    boot installed the required ones; what a proxy that booted before the compiled core lacks is gcc
    and python3.11-devel, optional (a failure to install them leaves the core pure, never fails the
    step). The Python packages still come from the release alone (``--offline``)."""
    return [
        "set -euo pipefail",
        "WORK=$(mktemp -d)",
        "trap 'rm -rf \"$WORK\"' EXIT",
        'aws s3 cp --only-show-errors --region "{{ Region }}" "{{ AssetUrl }}" "$WORK/release.zip"',
        'python3.11 -m zipfile -e "$WORK/release.zip" "$WORK/src"',
        "printf '%s' '{{ Settings }}' | base64 -d > \"$WORK/site.toml\"",
        'bash "$WORK/src/deploy/install.sh" --source "$WORK/src" --settings "$WORK/site.toml" '
        '--release-id "{{ ReleaseId }}" --offline',
    ]


class ProxyRelease(Construct):
    """The code asset, the settings and release parameters, and the roll-out document."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        site_settings: str,
        source_dir: Path = REPO_ROOT,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.asset = s3_assets.Asset(self, "ProxyCode", path=str(source_dir), exclude=list(ASSET_EXCLUDE))
        self.site_settings = site_settings
        prefix = f"/{stack.stack_name}/clearip-proxy"
        self.release_parameter_name = f"{prefix}/release"
        self.settings_parameter_name = f"{prefix}/settings"
        self.release_parameter = ssm.StringParameter(
            self,
            "ReleaseParameter",
            parameter_name=self.release_parameter_name,
            description="The proxy release a new instance installs: asset URL and hash",
            string_value=f"{self.asset.s3_object_url} {self.asset.asset_hash}",
        )
        self.settings_parameter = ssm.StringParameter(
            self,
            "SettingsParameter",
            parameter_name=self.settings_parameter_name,
            description="The proxies' site settings (settings.toml without host fields)",
            string_value=site_settings,
        )
        self.document_name = f"{stack.stack_name}-ApplyRelease"
        self.document = ssm.CfnDocument(
            self,
            "ApplyReleaseDocument",
            name=self.document_name,
            document_type="Command",
            document_format="JSON",
            target_type="/AWS::EC2::Instance",
            update_method="NewVersion",
            content={
                "schemaVersion": "2.2",
                "description": "Install a proxy release and the site settings with the release's "
                "deploy/install.sh: reload for reloadable settings, drained restart for a new release; "
                "fails when the proxy is not listening again.",
                "parameters": {
                    "AssetUrl": {
                        "type": "String",
                        "description": "s3:// URL of the release (the stack's code asset)",
                        "allowedPattern": r"^s3://[a-z0-9.-]+/[A-Za-z0-9._/-]+\.zip$",
                    },
                    "ReleaseId": {
                        "type": "String",
                        "description": "The asset hash, recorded in /opt/clearip-proxy/release-id",
                        "allowedPattern": r"^[A-Za-z0-9]{1,128}$",
                    },
                    "Settings": {
                        "type": "String",
                        "description": "The site settings file, base64",
                        "allowedPattern": r"^[A-Za-z0-9+/=]{1,8000}$",
                    },
                    "Region": {
                        "type": "String",
                        "description": "The asset bucket's region",
                        "allowedPattern": r"^[a-z0-9-]+$",
                    },
                },
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": "ApplyRelease",
                        "precondition": {"StringEquals": ["platformType", "Linux"]},
                        "inputs": {
                            "timeoutSeconds": str(INSTALL_TIMEOUT_SECONDS),
                            "runCommand": apply_release_commands(),
                        },
                    }
                ],
            },
        )
        self.association: ssm.CfnAssociation | None = None

    def grant_read(self, role: iam.IRole) -> None:
        """What a proxy reads at boot and at every update: the asset object and both parameters."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ReadOwnCodeAsset",
                actions=["s3:GetObject"],
                resources=[
                    f"arn:{Aws.PARTITION}:s3:::{self.asset.s3_bucket_name}/{self.asset.s3_object_key}"
                ],
            )
        )
        self.release_parameter.grant_read(role)
        self.settings_parameter.grant_read(role)

    def roll_out(self, instances: Sequence[ec2.Instance]) -> ssm.CfnAssociation:
        """The association that brings every proxy to this release and these settings, one at a time."""
        settings_b64 = base64.b64encode(self.site_settings.encode()).decode()
        self.association = ssm.CfnAssociation(
            self,
            "RollOut",
            name=self.document_name,
            association_name=f"{Stack.of(self).stack_name}-RollOut",
            targets=[
                ssm.CfnAssociation.TargetProperty(
                    key="InstanceIds", values=[i.instance_id for i in instances]
                )
            ],
            parameters={
                "AssetUrl": [self.asset.s3_object_url],
                "ReleaseId": [self.asset.asset_hash],
                "Settings": [settings_b64],
                "Region": [Aws.REGION],
            },
            # One proxy at a time; the first failure stops the roll-out (the others keep serving).
            max_concurrency="1",
            max_errors="0",
            compliance_severity="CRITICAL",
            # CloudFormation waits for every proxy: a proxy that does not come up fails the deploy.
            wait_for_success_timeout_seconds=INSTALL_TIMEOUT_SECONDS * len(instances),
        )
        self.association.node.add_dependency(self.document)
        return self.association
