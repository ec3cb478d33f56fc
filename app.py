#!/usr/bin/env python3
"""CDK entry point: deployment settings from the CDK context -> one ClearIpProxyStack.

    cdk deploy -c sip_cidrs=203.0.113.10/32,198.51.100.0/28 -c alarm_email=noc@example.net

The stack is environment-agnostic (no account/region lookups), so ``cdk synth`` works offline.
"""

from __future__ import annotations

import sys

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from infra.settings import DeploymentSettings, DeploymentSettingsError
from infra.stack import ClearIpProxyStack


def build_app(context: dict[str, object] | None = None) -> cdk.App:
    app = cdk.App(context=context) if context is not None else cdk.App()
    settings = DeploymentSettings.from_context(app.node.try_get_context)
    ClearIpProxyStack(app, settings.stack_name, settings=settings)
    cdk.Tags.of(app).add("Application", "clearip-proxy")
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


def main() -> None:
    try:
        app = build_app()
    except DeploymentSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    app.synth()


if __name__ == "__main__":
    main()
