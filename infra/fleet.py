"""The redundant EC2 proxies: Elastic IPs, instance role, the proxy as a CDK asset, user data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import (
    Acknowledgment,
    Aws,
    CfnCreationPolicy,
    CfnResourceSignal,
    Stack,
    Tags,
    Validations,
)
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from proxy_runtime.metrics import names

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_DATA_TEMPLATE = Path(__file__).with_name("user_data.sh")

# The asset is the runtime only: everything is excluded, then the runtime is let back in.
ASSET_EXCLUDE: tuple[str, ...] = (
    "*",
    ".*",
    "!proxy_runtime",
    "!proxy_runtime/**",
    "!deploy",
    "!deploy/**",
    "!pyproject.toml",
    "!requirements-runtime.txt",
    "**/__pycache__",
    "**/*.pyc",
    "**/.*",
)


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: its instance, Elastic IP and the network interface that carries the EIP."""

    name: str
    instance: ec2.Instance
    elastic_ip: ec2.CfnEIP
    interface: ec2.CfnNetworkInterface

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    @property
    def public_ip(self) -> str:
        return self.elastic_ip.ref  # Ref of an EIP is its public address


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
        sip_cidrs: Sequence[str],
        clearip_uri: str,
        timeout: float,
        key_pair: str | None = None,
        root_volume_gib: int = 16,
        signal_timeout_minutes: int = 20,
        listen_wait_seconds: int = 120,
        source_dir: Path = REPO_ROOT,
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

        self.asset = s3_assets.Asset(self, "ProxyCode", path=str(source_dir), exclude=list(ASSET_EXCLUDE))
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadOwnCodeAsset",
                actions=["s3:GetObject"],
                resources=[
                    f"arn:{Aws.PARTITION}:s3:::{self.asset.s3_bucket_name}/{self.asset.s3_object_key}"
                ],
            )
        )

        key = ec2.KeyPair.from_key_pair_name(self, "KeyPair", key_pair) if key_pair else None
        machine_image = ec2.MachineImage.latest_amazon_linux2023()
        self.proxies: list[Proxy] = []
        for i in range(proxy_count):
            name = f"Proxy{i + 1}"
            subnet = subnets[i % len(subnets)]
            # The Elastic IP sits on a network interface created before the instance, so the
            # instance boots with it and the user data can read it from IMDS (the association
            # cannot wait for the instance: the instance waits for its own cfn-signal).
            interface = ec2.CfnNetworkInterface(
                self,
                f"{name}Interface",
                subnet_id=subnet.subnet_id,
                group_set=[security_group.security_group_id],
                description=f"ClearIP {name} (carries its Elastic IP)",
            )
            eip = ec2.CfnEIP(self, f"{name}ElasticIp", domain="vpc")
            Tags.of(eip).add("Name", f"{stack.stack_name}-{name}")
            association = ec2.CfnEIPAssociation(
                self,
                f"{name}ElasticIpAssociation",
                allocation_id=eip.attr_allocation_id,
                network_interface_id=interface.ref,
            )
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
                disable_api_termination=True,
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
                user_data_causes_replacement=False,
            )
            cfn = instance.node.default_child
            assert isinstance(cfn, ec2.CfnInstance)
            # The interface carries subnet and security group; an instance cannot name both.
            cfn.add_property_deletion_override("SubnetId")
            cfn.add_property_deletion_override("SecurityGroupIds")
            cfn.add_property_override(
                "NetworkInterfaces", [{"DeviceIndex": "0", "NetworkInterfaceId": interface.ref}]
            )
            cfn.add_property_override(
                "MetadataOptions",
                {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            )
            cfn.node.add_dependency(association)
            cfn.cfn_options.creation_policy = CfnCreationPolicy(
                resource_signal=CfnResourceSignal(count=1, timeout=f"PT{signal_timeout_minutes}M")
            )
            instance.user_data.add_commands(
                # UserData.for_linux writes the shebang; the template's own is for shellcheck.
                render_user_data(
                    {
                        "STACK": Aws.STACK_NAME,
                        "RESOURCE": stack.get_logical_id(cfn),
                        "REGION": Aws.REGION,
                        "ASSET_URL": self.asset.s3_object_url,
                        "ELASTIC_IP": eip.ref,
                        "SIP_CIDRS": ",".join(sip_cidrs),
                        "CLEARIP_URI": clearip_uri,
                        "TIMEOUT": f"{timeout:g}",
                        "LISTEN_WAIT": str(listen_wait_seconds),
                    }
                ).removeprefix("#!/bin/bash\n")
            )
            Tags.of(instance).add("Name", f"{stack.stack_name}-{name}")
            Tags.of(instance).add("clearip-proxy", stack.stack_name)
            self.proxies.append(Proxy(name=name, instance=instance, elastic_ip=eip, interface=interface))

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
