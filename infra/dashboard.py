"""CloudWatch metrics as the alarms and the dashboard read them, and the dashboard's widgets.

Names, the namespace and the dimension come from :mod:`proxy_runtime.metrics.names` (the proxy's
own metrics) and :mod:`infra.logs` (the CloudWatch agent's host metrics), so a widget or an alarm
can never point at a metric nothing publishes. ``python -m infra.dashboard`` prints the dashboard's
widget list as docs/METRICS.md shows it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cw

from infra import logs
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


def host_metric(metric_name: str, instance_id: str, *, statistic: str, label: str | None = None) -> cw.Metric:
    """A CloudWatch agent metric (infra/logs.py configures the agent: namespace, names, dimension)."""
    return cw.Metric(
        namespace=logs.HOST_NAMESPACE,
        metric_name=metric_name,
        dimensions_map={logs.HOST_DIMENSION: instance_id},
        statistic=statistic,
        period=ONE_MINUTE,
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


def add_story_widgets(
    dashboard: cw.Dashboard, proxies: Sequence[MonitoredProxy], alarms: Sequence[cw.IAlarm]
) -> None:
    """The dashboard, top to bottom: is anything wrong, what calls did, how they were signed and
    verified, what blocked or failed them, the ClearIP link, and the hosts."""
    dashboard.add_widgets(
        cw.AlarmStatusWidget(
            title="Alarm status: anything not green is hurting calls now",
            alarms=list(alarms),
            width=24,
            height=2 + (len(alarms) + 3) // 4,
            sort_by=cw.AlarmStatusWidgetSortBy.STATE_UPDATED_TIMESTAMP,
        )
    )
    rows = "\n".join(f"| {p.name} | {p.public_ip} | {p.instance_id} |" for p in proxies)
    dashboard.add_widgets(
        cw.TextWidget(
            markdown="## ClearIP proxies\nCarriers and ClearIP whitelist these addresses.\n\n"
            "| proxy | public IP (Elastic IP) | instance |\n| --- | --- | --- |\n" + rows,
            width=24,
            height=2 + len(proxies),
        )
    )

    def per_proxy(spec: names.MetricSpec, statistic: str = cw.Stats.SUM) -> list[cw.IMetric]:
        return [proxy_metric(spec, p.instance_id, statistic=statistic, label=p.name) for p in proxies]

    counter = itertools.count()

    def total(spec: names.MetricSpec, label: str | None = None) -> cw.IMetric:
        """One line: ``spec`` summed over every proxy (a counter's Sum)."""
        j = next(counter)
        return cw.MathExpression(
            expression=" + ".join(f"m{j}p{i}" for i in range(len(proxies))),
            using_metrics={f"m{j}p{i}": proxy_metric(spec, p.instance_id) for i, p in enumerate(proxies)},
            label=label or spec.name,
            period=ONE_MINUTE,
        )

    def graph(
        title: str,
        left: Sequence[cw.IMetric],
        *,
        right: Sequence[cw.IMetric] = (),
        stacked: bool = False,
        left_y_axis: cw.YAxisProps | None = None,
    ) -> cw.GraphWidget:
        return cw.GraphWidget(
            title=title,
            left=list(left),
            right=list(right),
            stacked=stacked,
            left_y_axis=left_y_axis,
            width=12,
            height=6,
        )

    outcome = names.CLEARIP_OUTCOME_METRICS
    # 1. Calls and how they ended; post-dial delay.
    dashboard.add_widgets(
        graph(
            "Calls per minute",
            [
                total(names.CALLS, "Calls"),
                total(names.CALLS_ANSWERED, "Answered (2xx)"),
                total(names.PROXY_FAILED_CALLS, "Failed by the proxy"),
                total(names.CARRIERS_FAILED_CALLS, "Every carrier failed"),
                total(names.EMERGENCY_BYPASS, "Emergency (no ClearIP)"),
                total(names.OVERLOAD_REJECTED, "Refused: overload"),
                total(names.CLEARIP_BREAKER_REJECTED, "Refused: ClearIP breaker open"),
            ],
        ),
        graph(
            "How long callers wait: post-dial delay p50 / p99 (ms)",
            [
                proxy_metric(names.POST_DIAL_DELAY, p.instance_id, statistic=stat, label=f"{p.name} {stat}")
                for p in proxies
                for stat in ("p50", "p99")
            ],
        ),
    )
    # 2. STIR/SHAKEN: how outbound calls were signed, how inbound calls verified.
    dashboard.add_widgets(
        graph(
            "How outbound calls were signed: SHAKEN attestation per minute",
            [
                *(total(m, f"Attestation {k}") for k, m in names.STIR_ATTESTATION_METRICS.items()),
                total(names.STIR_DIV_CALLS, "With diversion PASSporTs"),
                total(names.STIR_UNDECODABLE, "Identity unreadable"),
            ],
            stacked=False,
        ),
        graph(
            "How inbound calls verified: verstat per minute",
            [total(m, k) for k, m in names.STIR_VERSTAT_METRICS.items()],
        ),
    )
    # 3. Blocks, carrier failures and route advances.
    dashboard.add_widgets(
        graph(
            "Blocked calls per minute (603 / 603+ Network Blocked / 607 / 608)",
            [total(m, k) for k, m in names.BLOCKED_METRICS.items()],
            stacked=True,
        ),
        graph(
            "Are carriers failing? Route advances and calls with every carrier failed",
            [
                total(names.CARRIERS_FAILED_CALLS, "Every carrier failed"),
                *[
                    proxy_metric(names.ROUTE_ADVANCES, p.instance_id, label=f"{p.name} route advances")
                    for p in proxies
                ],
            ],
        ),
    )
    # 4. What ClearIP answered; dropped and malformed traffic (allow-list drift, scanners).
    dashboard.add_widgets(
        graph(
            "ClearIP outcomes per minute (all proxies)",
            [total(m) for m in outcome.values()],  # every ClearIP answer the proxy tells apart
        ),
        graph(
            "Is SIP being dropped? Untrusted sources and malformed messages",
            [
                *[
                    proxy_metric(names.UNTRUSTED_DROPPED, p.instance_id, label=f"{p.name} untrusted")
                    for p in proxies
                ],
                *[
                    proxy_metric(names.MALFORMED_MESSAGES, p.instance_id, label=f"{p.name} malformed")
                    for p in proxies
                ],
            ],
        ),
    )
    # 5. The ClearIP link.
    dashboard.add_widgets(
        graph(
            "Is ClearIP reachable? Link up, breaker open, reconnects",
            per_proxy(names.CLEARIP_CONNECTED, cw.Stats.MINIMUM),
            right=[
                *[
                    proxy_metric(
                        names.CLEARIP_BREAKER_OPEN,
                        p.instance_id,
                        statistic=cw.Stats.MAXIMUM,
                        label=f"{p.name} breaker open",
                    )
                    for p in proxies
                ],
                *[
                    proxy_metric(names.CLEARIP_RECONNECTS, p.instance_id, label=f"{p.name} reconnects")
                    for p in proxies
                ],
            ],
            left_y_axis=cw.YAxisProps(min=0, max=1, show_units=False),
        ),
        graph(
            "How fast ClearIP answers: latency p50 / p99 (ms)",
            [
                proxy_metric(names.CLEARIP_LATENCY, p.instance_id, statistic=stat, label=f"{p.name} {stat}")
                for p in proxies
                for stat in ("p50", "p99")
            ],
        ),
    )
    # 6. The hosts.
    dashboard.add_widgets(
        graph(
            "Host health: memory and disk used (%), heartbeat",
            [
                *[
                    host_metric(
                        logs.MEM_USED_PERCENT,
                        p.instance_id,
                        statistic=cw.Stats.AVERAGE,
                        label=f"{p.name} memory",
                    )
                    for p in proxies
                ],
                *[
                    host_metric(
                        logs.DISK_USED_PERCENT,
                        p.instance_id,
                        statistic=cw.Stats.MAXIMUM,
                        label=f"{p.name} disk",
                    )
                    for p in proxies
                ],
            ],
            right=per_proxy(names.HEARTBEAT, cw.Stats.SAMPLE_COUNT),
            left_y_axis=cw.YAxisProps(min=0, max=100),
        ),
        graph(
            "CPU utilisation (%)",
            [
                ec2_metric("CPUUtilization", p.instance_id, statistic=cw.Stats.AVERAGE).with_(label=p.name)
                for p in proxies
            ],
        ),
    )


# ---- the dashboard as docs/METRICS.md shows it --------------------------------------------------
DOC_BEGIN = "<!-- dashboard:begin (generated: python -m infra.dashboard) -->"
DOC_END = "<!-- dashboard:end -->"


def _flatten(value: Any) -> str:
    """A CloudFormation string expression (Fn::Join of literals and references) as readable text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Fn::Join" in value:
            sep, parts = value["Fn::Join"]
            return str(sep).join(_flatten(p) for p in parts)
        if "Ref" in value:
            return "{" + str(value["Ref"]).replace("AWS::", "") + "}"
        if "Fn::GetAtt" in value:
            return "{" + ".".join(value["Fn::GetAtt"]) + "}"
    raise ValueError(f"cannot render {value!r}")


def _series(metric: list[Any]) -> str:
    """One entry of a graph widget's ``metrics`` array, as a label."""
    opts = metric[-1] if metric and isinstance(metric[-1], dict) else {}
    if "expression" in opts:
        return str(opts.get("label") or opts["expression"])
    label = opts.get("label")
    name = next((m for m in metric[1:2] if isinstance(m, str) and m != "."), "")
    stat = opts.get("stat", "Average")
    return f"{label or name} ({name} {stat})".strip() if label else f"{name} {stat}".strip()


def render_markdown(dashboard_body: Any) -> str:
    """The widget list of a synthesized dashboard body (a template's ``DashboardBody``)."""
    body = json.loads(_flatten(dashboard_body))
    lines = [DOC_BEGIN, "| # | Widget (what it answers) | Lines |", "|---|---|---|"]
    for i, w in enumerate(body["widgets"], 1):
        props = w["properties"]
        if w["type"] == "alarm":
            title = props.get("title", "Alarms")
            shown = f"{len(props['alarms'])} alarms, most recently changed first"
        elif w["type"] == "text":
            title = props["markdown"].splitlines()[0].lstrip("# ")
            shown = "text: each proxy's Elastic IP and instance"
        else:
            title = props.get("title", "")
            visible = [
                m
                for m in props.get("metrics", [])
                if not (isinstance(m[-1], dict) and m[-1].get("visible") is False)
            ]
            shown = "; ".join(dict.fromkeys(_series(m) for m in visible))
        lines.append(f"| {i} | {title} | {shown} |")
    lines.append(DOC_END)
    return "\n".join(lines)


# The example deployment the doc shows (the site's own site.toml, if any, is not read): two proxies.
DOC_SETTINGS = {"sip_cidrs": "203.0.113.10/32", "ami": "ami-03cf127a", "alarm_email": ""}


def _default_body() -> Any:
    import aws_cdk as cdk
    from aws_cdk.assertions import Template

    from infra.settings import DeploymentSettings
    from infra.stack import ClearIpProxyStack

    app = cdk.App()
    settings = DeploymentSettings.from_mapping(DOC_SETTINGS)
    stack = ClearIpProxyStack(app, settings.stack_name, settings=settings)
    (dash,) = Template.from_stack(stack).find_resources("AWS::CloudWatch::Dashboard").values()
    return dash["Properties"]["DashboardBody"]


if __name__ == "__main__":
    print(render_markdown(_default_body()))
