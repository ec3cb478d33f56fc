#!/usr/bin/env python3
"""CDK entry point: the site's settings file (cdk.json names it) -> one ClearIpProxyStack.

    cdk deploy                       # deploys what site.toml says (proxies updated if it changed)
    cdk deploy -c timeout=3          # one explicit override for this run

The stack is environment-agnostic (no account/region lookups), so ``cdk synth`` works offline.
The code asset carries the runtime's wheels (``make wheels``; cdk.json's build step runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from infra.settings import DeploymentSettings, DeploymentSettingsError
from infra.stack import ClearIpProxyStack
from infra.wheels import complete as wheels_complete

APP_DIR = Path(__file__).resolve().parent


def build_app(context: dict[str, object] | None = None) -> cdk.App:
    app = cdk.App(context=context) if context is not None else cdk.App()
    settings = DeploymentSettings.from_context(app.node.try_get_context, base_dir=APP_DIR)
    ClearIpProxyStack(app, settings.stack_name, settings=settings)
    # Not on the two SSM parameters: moto (the deploy tests' AWS) cannot create a parameter with tags
    # from CloudFormation (it reads the Tags map as a list); nothing selects them by tag.
    cdk.Tags.of(app).add("Application", "clearip-proxy", exclude_resource_types=["AWS::SSM::Parameter"])
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


def main() -> None:
    try:
        app = build_app()
    except DeploymentSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # An instance installs from the asset alone: without every wheel it could not boot.
    if not wheels_complete():
        print(
            "error: wheels/ does not hold every wheel of requirements-runtime.lock and "
            "requirements-build.lock: run make wheels",
            file=sys.stderr,
        )
        sys.exit(2)
    app.synth()


if __name__ == "__main__":
    main()
