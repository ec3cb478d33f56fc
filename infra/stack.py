"""ClearIpProxyStack: the network, the proxies, their monitoring and operations, wired together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import CfnOutput, Stack
from constructs import Construct

from infra.fleet import ProxyFleet
from infra.logs import ProxyLogs
from infra.monitoring import MonitoredProxy, ProxyMonitoring
from infra.network import ProxyNetwork
from infra.operations import ProxyOperations
from infra.release import REPO_ROOT, ProxyRelease
from infra.settings import DeploymentSettings


class ClearIpProxyStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        source_dir: Path = REPO_ROOT,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="ClearIP in-line SIP proxies: VPC, redundant EC2 proxies with Elastic IPs, alarms, "
            "dashboard, Session Manager documents",
            **kwargs,
        )
        self.settings = settings
        self.network = ProxyNetwork(self, "Network", sip_cidrs=settings.sip_cidrs, ssh_cidr=settings.ssh_cidr)
        self.release = ProxyRelease(
            self, "Release", site_settings=settings.site_settings_toml(), source_dir=source_dir
        )
        self.fleet = ProxyFleet(
            self,
            "Fleet",
            vpc=self.network.vpc,
            subnets=self.network.public_subnets,
            security_group=self.network.security_group,
            proxy_count=settings.proxy_count,
            instance_type=settings.instance_type,
            key_pair=settings.key_pair,
            ami=settings.ami,
            release=self.release,
            eip_allocations=settings.eip_allocations,
        )
        roll_out = self.release.roll_out(self.fleet.instances)
        self.logs = ProxyLogs(self, "Logs", instance_ids=[p.instance_id for p in self.fleet.proxies])
        self.logs.grant_to(self.fleet.role)
        self.monitoring = ProxyMonitoring(
            self,
            "Monitoring",
            proxies=[
                MonitoredProxy(name=p.name, instance_id=p.instance_id, public_ip=p.public_ip)
                for p in self.fleet.proxies
            ],
            thresholds=settings.thresholds,
            alarm_email=settings.alarm_email,
        )
        self.operations = ProxyOperations(self, "Operations", instance_role=self.fleet.role)

        for p in self.fleet.proxies:
            CfnOutput(self, f"{p.name}PublicIp", value=p.public_ip, description=f"{p.name}'s Elastic IP")
            CfnOutput(self, f"{p.name}InstanceId", value=p.instance_id, description=f"{p.name}'s instance id")
            CfnOutput(
                self,
                f"{p.name}AllocationId",
                value=p.allocation_id,
                description=f"{p.name}'s Elastic IP allocation (retained when the stack is deleted; "
                "eip_allocations adopts it)",
            )
        CfnOutput(
            self, "DashboardUrl", value=self.monitoring.dashboard_url, description="CloudWatch dashboard"
        )
        CfnOutput(self, "AlarmTopicArn", value=self.monitoring.topic.topic_arn, description="SNS alarm topic")
        CfnOutput(
            self, "TraceBucketName", value=self.operations.trace_bucket.bucket_name, description="SIP traces"
        )
        CfnOutput(
            self, "ApplyReleaseDocumentName", value=self.release.document_name, description="SSM document"
        )
        CfnOutput(
            self,
            "RollOutAssociationId",
            value=roll_out.ref,  # Ref is the association id (what CfnAssociation.association_ref uses)
            description="The release association: aws ssm start-associations-once --association-ids <this> "
            "re-applies the deployed release and settings to every proxy, one at a time",
        )
        CfnOutput(
            self,
            "CallsLogGroupName",
            value=self.logs.log_groups["calls"].log_group_name,
            description="Per-call JSON lines (Logs Insights: saved queries under ClearIP/<stack>/)",
        )
        CfnOutput(
            self,
            "SessionDocumentName",
            value=self.logs.session_document_name,
            description="Logged shell: aws ssm start-session --target <instance> --document-name <this>",
        )
        for key, name in self.operations.document_names.items():
            CfnOutput(self, f"{key}DocumentName", value=name, description=f"SSM document: {key}")
