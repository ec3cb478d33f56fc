"""Settings of the ClearIP outage handling: the connect wait and the brownout breaker."""

from __future__ import annotations

import pytest

from proxy_runtime.core.breaker import BreakerSettings, breaker_settings
from proxy_runtime.settings import SettingsError, load


def test_defaults_and_the_breaker_view_of_them() -> None:
    s = load(environ={})
    assert s.clearip_connect_wait == 0.5 and s.link_wait == 0.5
    assert breaker_settings(s) == BreakerSettings(threshold=5, window=30.0, cool_off=10.0, probe_every=10)


def test_the_connect_wait_is_never_more_than_half_of_timeout() -> None:
    s = load(environ={"CLEARIP_PROXY_TIMEOUT": "0.6", "CLEARIP_PROXY_CLEARIP_CONNECT_WAIT": "1.5"})
    assert s.link_wait == pytest.approx(0.3)


def test_from_the_environment() -> None:
    s = load(
        environ={
            "CLEARIP_PROXY_BREAKER_THRESHOLD": "0",
            "CLEARIP_PROXY_BREAKER_WINDOW": "12.5",
            "CLEARIP_PROXY_BREAKER_COOL_OFF": "3",
            "CLEARIP_PROXY_BREAKER_PROBE_EVERY": "1",
        }
    )
    assert breaker_settings(s) == BreakerSettings(threshold=0, window=12.5, cool_off=3.0, probe_every=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("clearip_connect_wait", "0"),
        ("clearip_connect_wait", "2.5"),
        ("clearip_connect_wait", "soon"),
        ("breaker_threshold", "-1"),
        ("breaker_threshold", "2.5"),
        ("breaker_window", "0"),
        ("breaker_cool_off", "-3"),
        ("breaker_probe_every", "0"),
    ],
)
def test_bad_values_stop_start_up_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(environ={f"CLEARIP_PROXY_{name.upper()}": value})
    assert err.value.setting == name
    assert name in str(err.value)
