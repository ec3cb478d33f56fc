"""The proxies' own VPC and the security group that admits SIP only from the trusted CIDRs."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

SIP_PORTS: tuple[tuple[str, int], ...] = (("udp", 5060), ("tcp", 5060), ("tcp", 5061))
"""(protocol, port) of the proxy's listeners: SIP over UDP and TCP, SIP over TLS."""


def _peer(cidr: str) -> ec2.IPeer:
    return ec2.Peer.ipv6(cidr) if ipaddress.ip_network(cidr).version == 6 else ec2.Peer.ipv4(cidr)


class ProxyNetwork(Construct):
    """A VPC over two AZs with public subnets only (no NAT), flow logs, and the proxies' security group.

    The proxies need direct internet access (ClearIP, carriers, CloudWatch, SSM) and carriers reach
    them on Elastic IPs, so there is nothing private to route: a NAT gateway would only add cost.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        sip_cidrs: Sequence[str],
        ssh_cidr: str | None = None,
        flow_log_retention: logs.RetentionDays = logs.RetentionDays.ONE_MONTH,
    ) -> None:
        super().__init__(scope, construct_id)

        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.60.0.0/16"),
            # Env-agnostic stack: two AZs chosen with Fn::GetAZs at deploy time, no lookup at synth.
            max_azs=2,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="Public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24)
            ],
            # Restricting the default security group needs a Lambda-backed custom resource; nothing
            # in this VPC uses the default group (every ENI gets the proxy group), so it stays unused.
            restrict_default_security_group=False,
        )
        self.flow_log_group = logs.LogGroup(
            self,
            "FlowLogGroup",
            retention=flow_log_retention,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.flow_log = self.vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(self.flow_log_group),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )

        self.security_group = ec2.SecurityGroup(
            self,
            "ProxySecurityGroup",
            vpc=self.vpc,
            description="ClearIP proxies: SIP (UDP/TCP 5060, TLS 5061) from the trusted CIDRs only",
            allow_all_outbound=True,
        )
        for cidr in sip_cidrs:
            for proto, port in SIP_PORTS:
                p = ec2.Port.udp(port) if proto == "udp" else ec2.Port.tcp(port)
                self.security_group.add_ingress_rule(
                    _peer(cidr), p, f"SIP {proto.upper()} {port} from {cidr}"
                )
        if ssh_cidr:
            self.security_group.add_ingress_rule(_peer(ssh_cidr), ec2.Port.tcp(22), f"SSH from {ssh_cidr}")
        self.public_subnets: list[ec2.ISubnet] = list(self.vpc.public_subnets)
