"""Alerting and the dashboard: an SNS topic, one set of alarms per proxy, one dashboard per stack.

Metric names, the namespace and the dimension come from :mod:`proxy_runtime.metrics.names`, the
module the proxy's publisher uses, so an alarm can never watch a metric the proxy does not send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_cdk import Aws, Duration, Stack
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

from infra.settings import AlarmThresholds
from proxy_runtime.metrics import names

ONE_MINUTE = Duration.minutes(1)
FIVE_MINUTES = Duration.minutes(5)


@dataclass(frozen=True, slots=True)
class MonitoredProxy:
    """What the monitoring needs to know about one proxy."""

    name: str
    instance_id: str
    public_ip: str


def proxy_metric(
    spec: names.MetricSpec,
    proxy_id: str,
    *,
    statistic: str = cw.Stats.SUM,
    period: Duration = ONE_MINUTE,
    label: str | None = None,
) -> cw.Metric:
    """One of the proxy's own metrics (namespace and dimension from the shared names module)."""
    return cw.Metric(
        namespace=names.NAMESPACE,
        metric_name=spec.name,
        dimensions_map={names.DIMENSION_PROXY_ID: proxy_id},
        statistic=statistic,
        period=period,
        label=label,
    )


def ec2_metric(
    metric_name: str, instance_id: str, *, statistic: str, period: Duration = ONE_MINUTE
) -> cw.Metric:
    return cw.Metric(
        namespace="AWS/EC2",
        metric_name=metric_name,
        dimensions_map={"InstanceId": instance_id},
        statistic=statistic,
        period=period,
    )


class ProxyMonitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        proxies: Sequence[MonitoredProxy],
        thresholds: AlarmThresholds,
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
        for p in proxies:
            self._add_proxy_alarms(p, thresholds)
        self.dashboard_name = dashboard_name or stack.stack_name
        self.dashboard = cw.Dashboard(self, "Dashboard", dashboard_name=self.dashboard_name)
        self._add_widgets(proxies)
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
        alarm = cw.Alarm(
            self,
            construct_id,
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
            metric=proxy_metric(names.HEARTBEAT, p.instance_id, statistic=cw.Stats.SAMPLE_COUNT),
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

    # ---- dashboard ---------------------------------------------------------------------------
    def _add_widgets(self, proxies: Sequence[MonitoredProxy]) -> None:
        rows = "\n".join(f"| {p.name} | {p.public_ip} | {p.instance_id} |" for p in proxies)
        self.dashboard.add_widgets(
            cw.TextWidget(
                markdown="## ClearIP proxies\nCarriers and ClearIP whitelist these addresses.\n\n"
                "| proxy | public IP (Elastic IP) | instance |\n| --- | --- | --- |\n" + rows,
                width=24,
                height=2 + len(proxies),
            )
        )

        def per_proxy(spec: names.MetricSpec, statistic: str = cw.Stats.SUM) -> list[cw.IMetric]:
            return [proxy_metric(spec, p.instance_id, statistic=statistic, label=p.name) for p in proxies]

        outcomes = [
            names.ClearIpOutcome.REDIRECT_302,
            names.ClearIpOutcome.REDIRECT_300,
            names.ClearIpOutcome.REDIRECT_UNUSABLE,
            names.ClearIpOutcome.UNAVAILABLE_503,
            names.ClearIpOutcome.NOT_FOUND_404,
            names.ClearIpOutcome.BLOCKED_603,
            names.ClearIpOutcome.UNWANTED_607,
            names.ClearIpOutcome.REJECTED_608,
            names.ClearIpOutcome.FORBIDDEN_403,
            names.ClearIpOutcome.TIMEOUT,
        ]
        outcome_metrics: list[cw.IMetric] = [
            cw.MathExpression(
                expression=" + ".join(f"o{j}p{i}" for i in range(len(proxies))),
                using_metrics={
                    f"o{j}p{i}": proxy_metric(names.CLEARIP_OUTCOME_METRICS[o], p.instance_id)
                    for i, p in enumerate(proxies)
                },
                label=names.CLEARIP_OUTCOME_METRICS[o].name,
                period=ONE_MINUTE,
            )
            for j, o in enumerate(outcomes)
        ]
        latency: list[cw.IMetric] = [
            proxy_metric(names.CLEARIP_LATENCY, p.instance_id, statistic=stat, label=f"{p.name} {stat}")
            for p in proxies
            for stat in ("p50", "p99")
        ]
        self.dashboard.add_widgets(
            cw.GraphWidget(title="Calls per minute", left=per_proxy(names.CALLS), width=12, stacked=True),
            cw.GraphWidget(title="ClearIP outcomes per minute (all proxies)", left=outcome_metrics, width=12),
        )
        self.dashboard.add_widgets(
            cw.GraphWidget(title="ClearIP latency p50 / p99 (ms)", left=latency, width=12),
            cw.GraphWidget(
                title="Carrier route advances per minute", left=per_proxy(names.ROUTE_ADVANCES), width=12
            ),
        )
        self.dashboard.add_widgets(
            cw.GraphWidget(
                title="Heartbeat and ClearIP connection",
                left=per_proxy(names.HEARTBEAT, cw.Stats.SAMPLE_COUNT),
                right=per_proxy(names.CLEARIP_CONNECTED, cw.Stats.MINIMUM),
                width=12,
            ),
            cw.GraphWidget(
                title="CPU utilisation (%)",
                left=[
                    ec2_metric("CPUUtilization", p.instance_id, statistic=cw.Stats.AVERAGE).with_(
                        label=p.name
                    )
                    for p in proxies
                ],
                width=12,
            ),
        )
