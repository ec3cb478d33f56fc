"""`cdk destroy` that says what it keeps: ``python -m infra.destroy [--stack NAME] [--force]``.

The Elastic IPs (whitelisted by ClearIP and every carrier), the trace bucket and the VPC flow-log
group outlive the stack (``RemovalPolicy.RETAIN``). Before the stack goes this reads its outputs;
after ``cdk destroy`` succeeds it lists what is still there and prints the ``eip_allocations`` lines
that make a rebuilt stack adopt the same addresses (docs/DEPLOY.md, "Addresses").
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import botocore.session

REPO_ROOT = Path(__file__).resolve().parents[1]


def stack_outputs(stack: str) -> dict[str, str]:
    """The stack's outputs (credentials, region and endpoint as the AWS CLI and CDK find them)."""
    client = botocore.session.get_session().create_client("cloudformation")
    (found,) = client.describe_stacks(StackName=stack)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", [])}


def kept_report(outputs: Mapping[str, str]) -> str:
    """What survives the stack, and the settings that adopt the addresses again."""
    proxies = sorted(
        {m.group(1) for k in outputs if (m := re.fullmatch(r"(Proxy\d+)AllocationId", k))},
        key=lambda name: int(name.removeprefix("Proxy")),
    )
    lines = ["Kept (not deleted with the stack):"]
    for name in proxies:
        lines.append(f"  {name}'s Elastic IP {outputs[f'{name}PublicIp']} ({outputs[f'{name}AllocationId']})")
    if "TraceBucketName" in outputs:
        lines.append(f"  the trace bucket {outputs['TraceBucketName']} (its traces expire on their own)")
    lines.append("  the VPC flow-log group (its records expire on their own)")
    lines += ["", "To rebuild the site behind the same addresses, add to the settings file:"]
    for name in proxies:
        lines += [
            "[[eip_allocations]]",
            f'allocation_id = "{outputs[f"{name}AllocationId"]}"   # {name}',
            f'address = "{outputs[f"{name}PublicIp"]}"',
        ]
    lines.append("Release an address you no longer need: aws ec2 release-address --allocation-id ID")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.destroy", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", default="ClearIpProxy", help="stack name (default ClearIpProxy)")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("cdk_args", nargs="*", help="further arguments for cdk destroy (after --)")
    args = p.parse_args(argv)
    outputs = stack_outputs(args.stack)
    cdk = REPO_ROOT / "node_modules" / ".bin" / "cdk"
    cmd = [str(cdk), "destroy", args.stack, *(["--force"] if args.force else []), *args.cdk_args]
    rc = subprocess.call(cmd, cwd=REPO_ROOT)
    if rc == 0:
        print(kept_report(outputs))
    return rc


if __name__ == "__main__":
    sys.exit(main())
