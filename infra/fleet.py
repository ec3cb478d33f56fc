"""The redundant EC2 proxies: Elastic IPs (retained, adoptable), a pinned image, the instance role,
first-boot user data.

Day 2 (see infra/release.py for settings and code): an instance is replaced only when its image
(``ami``), type or key pair change. The proxies are chained (each waits for the previous one's
instance and address), so CloudFormation replaces them one at a time: the new instance boots,
installs the current release and signals that it listens, its Elastic IP moves to it, and only
then the next one starts; a new proxy that does not come up fails and rolls back the deploy before
the next is touched. Each instance has its own primary network interface and no termination
protection, so the old one can be deleted (its proxy drains on shutdown) and ``cdk destroy`` works;
the Elastic IPs are retained when the stack is deleted, and ``eip_allocations`` adopts them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jsii
from aws_cdk import (
    Acknowledgment,
    CfnCreationPolicy,
    CfnResourceSignal,
    RemovalPolicy,
    Stack,
    Tags,
    Validations,
)
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra.release import REPO_ROOT, ProxyRelease
from proxy_runtime.metrics import names

__all__ = ["REPO_ROOT", "USER_DATA_TEMPLATE", "PinnedImage", "Proxy", "ProxyFleet", "render_user_data"]

USER_DATA_TEMPLATE = Path(__file__).with_name("user_data.sh")


@jsii.implements(ec2.IMachineImage)
class PinnedImage:
    """An AMI id recorded in the settings: the image changes only when the operator changes it
    (``MachineImage.latest_amazon_linux2023()`` resolves a new image whenever AWS publishes one)."""

    def __init__(self, ami: str) -> None:
        self.ami = ami

    def get_image(self, scope: Construct) -> ec2.MachineImageConfig:
        return ec2.MachineImageConfig(
            image_id=self.ami,
            os_type=ec2.OperatingSystemType.LINUX,
            user_data=ec2.UserData.for_linux(shebang="#!/bin/bash"),
        )


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: its instance, its Elastic IP's allocation and address, and their association."""

    name: str
    instance: ec2.Instance
    allocation_id: str
    public_ip: str
    association: ec2.CfnEIPAssociation
    elastic_ip: ec2.CfnEIP | None  # None when the address is adopted (eip_allocations)

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id


def render_user_data(values: Mapping[str, str]) -> str:
    """The first-boot script with ``@@KEY@@`` placeholders filled (values may be CDK tokens)."""
    text = USER_DATA_TEMPLATE.read_text()
    for key, value in values.items():
        if "'" in value:
            raise ValueError(f"user data value {key} must not contain a single quote: {value!r}")
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise ValueError("user data template has an unfilled placeholder")
    return text


class ProxyFleet(Construct):
    """``proxy_count`` proxies spread over the given subnets (one AZ each, round robin)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        subnets: Sequence[ec2.ISubnet],
        security_group: ec2.ISecurityGroup,
        proxy_count: int,
        instance_type: str,
        ami: str,
        release: ProxyRelease,
        eip_allocations: Sequence[tuple[str, str]] = (),
        key_pair: str | None = None,
        root_volume_gib: int = 16,
        signal_timeout_minutes: int = 20,
        listen_wait_seconds: int = 120,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)

        self.role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="ClearIP proxy instances: Session Manager, proxy metrics, their own code asset",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="PublishProxyMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": names.NAMESPACE}},
            )
        )

        release.grant_read(self.role)
        self.release = release

        key = ec2.KeyPair.from_key_pair_name(self, "KeyPair", key_pair) if key_pair else None
        machine_image = PinnedImage(ami)
        self.proxies: list[Proxy] = []
        previous: list[Construct] = []
        for i in range(proxy_count):
            name = f"Proxy{i + 1}"
            subnet = subnets[i % len(subnets)]
            eip: ec2.CfnEIP | None = None
            if i < len(eip_allocations):
                allocation_id, public_ip = eip_allocations[i]
            else:
                eip = ec2.CfnEIP(self, f"{name}ElasticIp", domain="vpc")
                # Carriers and ClearIP whitelist the address: it outlives the stack, and a new stack
                # adopts it with eip_allocations.
                eip.apply_removal_policy(RemovalPolicy.RETAIN)
                Tags.of(eip).add("Name", f"{stack.stack_name}-{name}")
                allocation_id, public_ip = eip.attr_allocation_id, eip.ref  # Ref is the address
            instance = ec2.Instance(
                self,
                name,
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
                security_group=security_group,
                instance_type=ec2.InstanceType(instance_type),
                machine_image=machine_image,
                role=self.role,
                key_pair=key,
                detailed_monitoring=True,
                block_devices=[
                    ec2.BlockDevice(
                        device_name="/dev/xvda",
                        volume=ec2.BlockDeviceVolume.ebs(
                            root_volume_gib,
                            encrypted=True,
                            volume_type=ec2.EbsDeviceVolumeType.GP3,
                            delete_on_termination=True,
                        ),
                    )
                ],
                user_data=ec2.UserData.for_linux(shebang="#!/bin/bash"),
                # User data runs at first boot only; later changes travel by the release association.
                user_data_causes_replacement=False,
            )
            cfn = instance.node.default_child
            assert isinstance(cfn, ec2.CfnInstance)
            cfn.add_property_override(
                "MetadataOptions",
                {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            )
            Validations.of(cfn).acknowledge(
                Acknowledgment(
                    id="AwsSolutions::AwsSolutions-EC29",
                    reason="Termination protection would stop CloudFormation from deleting a replaced "
                    "proxy (a new image) and make cdk destroy fail; the proxies hold no state, their "
                    "Elastic IPs are retained, and a deleted proxy comes back with cdk deploy.",
                ),
                Acknowledgment(
                    id="CloudFormation-Validate::W9010",
                    reason="The image is pinned on purpose (the ami setting): a proxy's image changes only "
                    "when the operator records a new one, never because AWS published one.",
                ),
            )
            cfn.cfn_options.creation_policy = CfnCreationPolicy(
                resource_signal=CfnResourceSignal(count=1, timeout=f"PT{signal_timeout_minutes}M")
            )
            # One at a time: this proxy is created or replaced only once the previous one is up and
            # carries its address again.
            for dep in previous:
                cfn.node.add_dependency(dep)
            # First boot reads the current release and settings from the parameters.
            cfn.node.add_dependency(release.release_parameter, release.settings_parameter)
            instance.user_data.add_commands(
                # UserData.for_linux writes the shebang; the template's own is for shellcheck.
                # Only values that never change for this instance: a change of user data would stop
                # and start it, and cloud-init would not run it again anyway.
                render_user_data(
                    {
                        "STACK": stack.stack_name,
                        "RESOURCE": stack.get_logical_id(cfn),
                        "REGION": stack.region,
                        "ELASTIC_IP": public_ip,
                        "RELEASE_PARAMETER": release.release_parameter_name,
                        "SETTINGS_PARAMETER": release.settings_parameter_name,
                        "LISTEN_WAIT": str(listen_wait_seconds),
                    }
                ).removeprefix("#!/bin/bash\n")
            )
            association = ec2.CfnEIPAssociation(
                self,
                f"{name}ElasticIpAssociation",
                allocation_id=allocation_id,
                instance_id=instance.instance_id,
            )
            Tags.of(instance).add("Name", f"{stack.stack_name}-{name}")
            Tags.of(instance).add("clearip-proxy", stack.stack_name)
            self.proxies.append(
                Proxy(
                    name=name,
                    instance=instance,
                    allocation_id=allocation_id,
                    public_ip=public_ip,
                    association=association,
                    elastic_ip=eip,
                )
            )
            previous = [cfn, association]

        Validations.of(self.role).acknowledge(
            Acknowledgment(
                id="AwsSolutions::AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/"
                "AmazonSSMManagedInstanceCore]",
                reason="AmazonSSMManagedInstanceCore is the AWS-maintained minimum for Session Manager and "
                "Run Command (the stack's SSM documents); AWS updates it as the SSM agent's needs change.",
            ),
            Acknowledgment(
                id="AwsSolutions::AwsSolutions-IAM5[Resource::*]",
                reason="cloudwatch:PutMetricData has no resource-level permissions; the statement is "
                f"limited by its cloudwatch:namespace condition to {names.NAMESPACE}.",
            ),
        )

    @property
    def instances(self) -> list[ec2.Instance]:
        return [p.instance for p in self.proxies]
