"""Alerting and the dashboard: an SNS topic, one set of alarms per proxy, one dashboard per stack.

Metric names, the namespace and the dimension come from :mod:`proxy_runtime.metrics.names`, the
module the proxy's publisher uses, so an alarm can never watch a metric the proxy does not send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import ArnFormat, Aws, Duration, Stack
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

from infra import logs
from infra.dashboard import (
    FIVE_MINUTES,
    MonitoredProxy,
    add_story_widgets,
    ec2_metric,
    host_metric,
    proxy_metric,
)
from infra.settings import AlarmThresholds
from proxy_runtime.metrics import names
from proxy_runtime.settings import MAX_METRICS_INTERVAL

# The heartbeat is judged per period; the proxy publishes at least once in each, as its settings
# refuse a metrics_interval longer than this (missing data breaches: a longer one would keep firing).
HEARTBEAT_PERIOD = Duration.seconds(MAX_METRICS_INTERVAL)

__all__ = ["HealthThresholds", "MonitoredProxy", "ProxyMonitoring", "proxy_metric"]


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """When the alarms on carriers, drift and the host fire (defaults a carrier NOC would start from)."""

    carriers_failed_percent: float = 20.0
    """Share of routed calls (5 min) that ended with every carrier failed, above which it alarms."""
    carriers_failed_min_calls: int = 20
    """Below this many routed calls in 5 minutes the carrier ratio is not judged."""
    memory_percent: float = 90.0
    """Memory used (%) above which, for 5 minutes on end, the memory alarm fires."""
    disk_percent: float = 85.0
    """Root file system used (%) above which the disk alarm fires."""


class ProxyMonitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        proxies: Sequence[MonitoredProxy],
        thresholds: AlarmThresholds,
        health: HealthThresholds | None = None,
        alarm_email: str | None = None,
        dashboard_name: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.topic = sns.Topic(
            self, "AlarmTopic", display_name=f"{stack.stack_name} alarms", enforce_ssl=True
        )
        if alarm_email:
            self.topic.add_subscription(subs.EmailSubscription(alarm_email))
        self._notify = cw_actions.SnsAction(self.topic)
        self.alarms: list[cw.Alarm] = []
        self.alarm_refs: list[cw.IAlarm] = []
        for p in proxies:
            self._add_proxy_alarms(p, thresholds)
            self._add_health_alarms(p, health or HealthThresholds())
        self.dashboard_name = dashboard_name or stack.stack_name
        self.dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=self.dashboard_name)
        add_story_widgets(self.dashboard, proxies, self.alarm_refs)
        self.dashboard_url = (
            f"https://{Aws.REGION}.console.aws.amazon.com/cloudwatch/home?region={Aws.REGION}"
            f"#dashboards:name={self.dashboard_name}"
        )

    # ---- alarms ------------------------------------------------------------------------------
    def _alarm(
        self,
        construct_id: str,
        *,
        metric: cw.IMetric,
        threshold: float,
        comparison: cw.ComparisonOperator,
        evaluation_periods: int,
        datapoints_to_alarm: int,
        treat_missing_data: cw.TreatMissingData,
        description: str,
        extra_actions: Sequence[cw.IAlarmAction] = (),
    ) -> cw.Alarm:
        """The one alarm builder: every alarm notifies the topic on ALARM and on OK."""
        stack = Stack.of(self)
        # The name is the sentence, prefixed with the stack: it is what the e-mail subject and the
        # console show ("ClearIpProxy Proxy1 drops SIP from sources it does not trust").
        name = f"{stack.stack_name} {construct_id}"
        alarm = cw.Alarm(
            self,
            construct_id,
            alarm_name=name,
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            datapoints_to_alarm=datapoints_to_alarm,
            treat_missing_data=treat_missing_data,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._notify, *extra_actions)
        alarm.add_ok_action(self._notify)
        # The dashboard names alarms by ARN built from the name (no Fn::GetAtt on the alarm: the
        # dashboard does not wait for, or break without, the alarms).
        arn = stack.format_arn(
            service="cloudwatch",
            resource="alarm",
            resource_name=name,
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        self.alarm_refs.append(cw.Alarm.from_alarm_arn(self, f"{construct_id} (by ARN)", arn))
        self.alarms.append(alarm)
        return alarm

    def _add_proxy_alarms(self, p: MonitoredProxy, t: AlarmThresholds) -> None:
        n = p.name
        gt = cw.ComparisonOperator.GREATER_THAN_THRESHOLD
        lt = cw.ComparisonOperator.LESS_THAN_THRESHOLD

        # The host under the proxy failed (hardware, network): EC2 recovers the instance onto new
        # hardware with the same instance id, Elastic IP and volume, so carriers' whitelists still hold.
        self._alarm(
            f"{n} system status check failed so EC2 recovers it",
            metric=ec2_metric("StatusCheckFailed_System", p.instance_id, statistic=cw.Stats.MAXIMUM),
            threshold=0,
            comparison=gt,
            evaluation_periods=2,
            datapoints_to_alarm=2,
            treat_missing_data=cw.TreatMissingData.MISSING,
            description=f"{n} ({p.instance_id}): AWS system status check failed; EC2 auto-recovery started.",
            extra_actions=[cw_actions.Ec2Action(cw_actions.Ec2InstanceAction.RECOVER)],
        )
        # The OS is unhealthy (kernel, disk full, network config): recovery cannot fix this; a human must.
        self._alarm(
            f"{n} instance status check failed",
            metric=ec2_metric("StatusCheckFailed_Instance", p.instance_id, statistic=cw.Stats.MAXIMUM),
            threshold=0,
            comparison=gt,
            evaluation_periods=3,
            datapoints_to_alarm=3,
            treat_missing_data=cw.TreatMissingData.MISSING,
            description=f"{n} ({p.instance_id}): instance status check failed (OS level). Reboot or inspect.",
        )
        # The proxy publishes a heartbeat every interval; silence means it crashed, hangs, or cannot
        # reach CloudWatch. No data is exactly the failure, so missing data breaches.
        self._alarm(
            f"{n} heartbeat is missing so the proxy is down or silent",
            metric=proxy_metric(
                names.HEARTBEAT, p.instance_id, statistic=cw.Stats.SAMPLE_COUNT, period=HEARTBEAT_PERIOD
            ),
            threshold=1,
            comparison=lt,
            evaluation_periods=t.heartbeat_missing_minutes,
            datapoints_to_alarm=t.heartbeat_missing_minutes,
            treat_missing_data=cw.TreatMissingData.BREACHING,
            description=f"{n} ({p.instance_id}): no {names.HEARTBEAT.name} for "
            f"{t.heartbeat_missing_minutes} min. Check `systemctl status clearip-proxy` via Session Manager.",
        )
        # Without ClearIP every call gets 503 and the switches route-advance around this proxy.
        # Missing data is the heartbeat alarm's job, so it does not breach here.
        self._alarm(
            f"{n} cannot reach ClearIP",
            metric=proxy_metric(names.CLEARIP_CONNECTED, p.instance_id, statistic=cw.Stats.MINIMUM),
            threshold=1,
            comparison=lt,
            evaluation_periods=t.clearip_down_minutes,
            datapoints_to_alarm=t.clearip_down_minutes,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): the connection to ClearIP was down for "
            f"{t.clearip_down_minutes} min. Run the Doctor document.",
        )
        # ClearIP answers slowly or not at all: calls wait `timeout` before the switch advances.
        self._alarm(
            f"{n} sees ClearIP timeouts above {t.clearip_timeouts} in 5 minutes",
            metric=proxy_metric(
                names.CLEARIP_OUTCOME_METRICS[names.ClearIpOutcome.TIMEOUT],
                p.instance_id,
                period=FIVE_MINUTES,
            ),
            threshold=t.clearip_timeouts,
            comparison=gt,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): more than {t.clearip_timeouts} ClearIP timeouts in 5 min.",
        )
        # A 403 means ClearIP does not know this proxy's address: the Elastic IP is not whitelisted
        # on the ClearIP account, and every call through this proxy fails.
        self._alarm(
            f"{n} gets 403 from ClearIP so its IP is not whitelisted",
            metric=proxy_metric(
                names.CLEARIP_OUTCOME_METRICS[names.ClearIpOutcome.FORBIDDEN_403], p.instance_id
            ),
            threshold=0,
            comparison=gt,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): ClearIP answered 403. Whitelist {p.public_ip} "
            "in the ClearIP portal.",
        )
        # Calls the proxy itself failed (timeouts, ClearIP unavailable, overload, internal errors)
        # as a share of all calls: the user-visible failure rate, judged only with enough traffic.
        failed = proxy_metric(names.PROXY_FAILED_CALLS, p.instance_id, period=FIVE_MINUTES)
        calls = proxy_metric(names.CALLS, p.instance_id, period=FIVE_MINUTES)
        self._alarm(
            f"{n} fails more than {t.failed_call_percent:g} percent of calls",
            metric=cw.MathExpression(
                expression=f"IF(calls >= {t.failed_call_min_calls}, 100 * failed / calls, 0)",
                using_metrics={"failed": failed, "calls": calls},
                period=FIVE_MINUTES,
                label="Calls failed by the proxy (%)",
            ),
            threshold=t.failed_call_percent,
            comparison=gt,
            evaluation_periods=2,
            datapoints_to_alarm=2,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): over {t.failed_call_percent:g}% of calls failed by "
            f"the proxy in two consecutive 5-min periods (at least {t.failed_call_min_calls} calls).",
        )

    def _add_health_alarms(self, p: MonitoredProxy, h: HealthThresholds) -> None:
        n = p.name
        gt = cw.ComparisonOperator.GREATER_THAN_THRESHOLD
        ge = cw.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD

        # Carriers failing: routed calls that ended 408/5xx after every Contact ClearIP gave us failed.
        # The switch then route-advances away from ClearIP's carriers, or the caller hears a failure.
        # No data means no routed calls (or no proxy: the heartbeat alarm's job), so it does not breach.
        failed = proxy_metric(names.CARRIERS_FAILED_CALLS, p.instance_id, period=FIVE_MINUTES)
        routed = proxy_metric(
            names.CARRIER_ATTEMPTS, p.instance_id, statistic=cw.Stats.SAMPLE_COUNT, period=FIVE_MINUTES
        )
        self._alarm(
            f"{n} sees every carrier fail on more than {h.carriers_failed_percent:g} percent of routed calls",
            metric=cw.MathExpression(
                expression=f"IF(routed >= {h.carriers_failed_min_calls}, 100 * failed / routed, 0)",
                using_metrics={"failed": failed, "routed": routed},
                period=FIVE_MINUTES,
                label="Routed calls with every carrier failed (%)",
            ),
            threshold=h.carriers_failed_percent,
            comparison=gt,
            evaluation_periods=2,
            datapoints_to_alarm=2,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): over {h.carriers_failed_percent:g}% of routed calls ended "
            f"408/5xx with every carrier failed, two 5-min periods running (at least "
            f"{h.carriers_failed_min_calls} routed calls). Check the carriers in the per-call lines "
            "(saved query 'Failed calls by cause').",
        )
        # Drift: the security group admits a source the proxy's own allow-list does not (a sip_cidrs
        # entry missing on the proxy), so that carrier's or switch's SIP is dropped in silence. The
        # security group already stops the internet, so any drop is worth a look. No data: no proxy
        # (heartbeat alarm), so missing data does not breach.
        self._alarm(
            f"{n} drops SIP from sources it does not trust",
            metric=proxy_metric(names.UNTRUSTED_DROPPED, p.instance_id, period=FIVE_MINUTES),
            threshold=0,
            comparison=gt,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): SIP from a source outside the proxy's allow-list was "
            "dropped. Compare sip_cidrs with the security group; `clearip-proxy doctor` shows the list.",
        )
        # ClearIP brownout: the breaker opened after repeated ClearIP timeouts, so calls get 503 at once
        # (the switch routes around this proxy) instead of waiting `timeout` each. Missing data is the
        # heartbeat alarm's job.
        self._alarm(
            f"{n} has its ClearIP breaker open so calls get 503 at once",
            metric=proxy_metric(names.CLEARIP_BREAKER_OPEN, p.instance_id, statistic=cw.Stats.MAXIMUM),
            threshold=1,
            comparison=ge,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
            description=f"{n} ({p.instance_id}): ClearIP answers too slowly (brownout); the breaker is "
            "open or probing. Calls are refused at once with 503 so switches route-advance.",
        )
        # Memory: the proxy holds every ringing call in memory; past this the kernel may kill it.
        # Missing data leaves the alarm INSUFFICIENT_DATA (grey on the dashboard): the CloudWatch agent
        # stopped reporting, which the alarm status widget shows rather than a false "memory high".
        self._alarm(
            f"{n} memory use is above {h.memory_percent:g} percent",
            metric=host_metric(logs.MEM_USED_PERCENT, p.instance_id, statistic=cw.Stats.AVERAGE),
            threshold=h.memory_percent,
            comparison=gt,
            evaluation_periods=5,
            datapoints_to_alarm=5,
            treat_missing_data=cw.TreatMissingData.MISSING,
            description=f"{n} ({p.instance_id}): memory above {h.memory_percent:g}% for 5 min. Look at "
            "InFlightTransactions and the proxy's RSS (`systemctl status clearip-proxy`).",
        )
        # Disk: a full root file system stops the journal, traces and the log export. Same missing-data
        # rule as memory.
        self._alarm(
            f"{n} disk use is above {h.disk_percent:g} percent",
            metric=host_metric(logs.DISK_USED_PERCENT, p.instance_id, statistic=cw.Stats.MAXIMUM),
            threshold=h.disk_percent,
            comparison=gt,
            evaluation_periods=5,
            datapoints_to_alarm=5,
            treat_missing_data=cw.TreatMissingData.MISSING,
            description=f"{n} ({p.instance_id}): root file system above {h.disk_percent:g}%. Clear "
            "/var/lib/clearip-proxy/traces and old journal files (`journalctl --vacuum-size=500M`).",
        )

    # ---- dashboard ---------------------------------------------------------------------------
