"""The default alert rule at the input rates users stream at: the shipped model's "yes" often lasts only about a
second after a thing appears (then fades while it stays on screen), and the default rule must still alert on it,
once, at 1, 2 and 10 probes per second, while a single stray "yes" at 10 per second stays silent."""

from __future__ import annotations

import pytest

from streamvlm.dialogue import ControllerConfig, DialogueController, Poll, TriggerSpec, make_rule


def _scores(rate: float) -> list[tuple[float, float]]:
    """20 s probed at ``rate``: a stray "yes" at 2.0 s (one probe), a thing appearing at 5 s whose "yes" lasts
    one second and then fades to 0.3 (in the band: not "no") while it stays, leaving at 9 s."""
    out = []
    for i in range(int(20 * rate)):
        t = i / rate
        p = 0.05
        if t == 2.0:
            p = 0.95
        elif 5.0 <= t < 6.0:
            p = 0.95
        elif 6.0 <= t < 9.0:
            p = 0.3
        out.append((t, p))
    return out


@pytest.mark.parametrize("rate", [1.0, 2.0, 10.0])
def test_a_short_lived_yes_alerts_once_at_any_rate(rate: float) -> None:
    controller = DialogueController(ControllerConfig())
    controller.add_watch("w", "a red circle appears", 0.0)
    alerts = []
    for t, p in _scores(rate):
        for action in controller.frame(t):
            assert isinstance(action, Poll)
            alerts += [a.evidence_t for a in controller.scores(t, {"w": p})]
    if rate == 10.0:
        assert alerts and 5.0 <= alerts[0] < 6.0 and len(alerts) == 1, alerts  # the stray 0.1 s "yes" at 2 s is not enough
    else:
        # At 1 and 2 probes per second a single "yes" probe stands for a second or half of one: the stray one
        # at 2 s alerts too (as one probe per second cannot tell it from a real one); the appearance alerts once.
        assert [t for t in alerts if t >= 5.0] and len([t for t in alerts if t >= 5.0]) == 1, alerts
        assert 5.0 <= [t for t in alerts if t >= 5.0][0] < 6.0, alerts


def test_default_rule_fires_within_a_second_of_the_first_yes_at_10_per_second() -> None:
    rule = make_rule(TriggerSpec())
    fires = [t for t, p in _scores(10.0) if rule.update(p, t)]
    assert len(fires) == 1 and 5.0 < fires[0] <= 6.0, fires
