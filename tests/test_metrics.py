"""The server's metrics: what a scraper reads from /metrics across sessions that come and go."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from streamvlm.server import metrics as metrics_module
from streamvlm.server.metrics import TTFT_BUCKETS, ServerMetrics


def scrape(metrics: ServerMetrics, accept: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape, keyed by (name, sorted labels)."""
    body, _ = metrics.render(accept)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_every_documented_metric_is_exported_and_nothing_else():
    documented = set(re.findall(r"``(streamvlm_[a-z_]+)(?:\{[a-z_,]+\})?``", metrics_module.__doc__ or ""))
    body, content_type = ServerMetrics().render()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(body.decode()))
    exported = set()
    for family in families:
        assert family.documentation, family.name
        suffix = "_total" if family.type == "counter" else ""
        if not family.name.endswith("_created"):
            exported.add(family.name + suffix)
    assert exported == documented
    assert "streamvlm_sessions_opened_total" in exported


def test_counters_keep_counting_after_sessions_end():
    m = ServerMetrics()
    live = []
    m.track_live(live=lambda: len(live), parked=lambda: 0, working_tokens=lambda: 100 * len(live))
    for session in ("a", "b"):
        m.session_opened()
        live.append(session)
        for _ in range(3):
            m.frame_received()
            m.frame_read(lag_s=0.02)
        m.frame_dropped("replaced")
        m.response_done("completed", "user")
    before = scrape(m)
    assert before[("streamvlm_sessions_live", ())] == 2
    assert before[("streamvlm_working_memory_tokens", ())] == 200
    live.clear()
    m.session_closed("client_closed")
    m.session_closed("client_closed")
    after = scrape(m)
    assert after[("streamvlm_sessions_live", ())] == 0
    for key in (("streamvlm_sessions_opened_total", ()), ("streamvlm_frames_received_total", ()),
                ("streamvlm_frames_read_total", ()), ("streamvlm_frames_dropped_total", (("reason", "replaced"),)),
                ("streamvlm_responses_total", (("status", "completed"), ("trigger", "user")))):
        assert after[key] == before[key] > 0, key
    assert after[("streamvlm_sessions_closed_total", (("reason", "client_closed"),))] == 2
    assert after[("streamvlm_frame_lag_seconds_count", ())] == 6


_OUTCOMES = st.sampled_from(["open", "resume", "refuse", "close", "frame", "drop", "read", "answer", "alert", "error", "fault", "ttft"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_OUTCOMES, st.sampled_from(["x", "y"])), max_size=60))
def test_every_counter_is_monotonic_and_exact(outcomes):
    """Any sequence of outcomes: each scrape's counters are the number of calls so far, never less
    than the scrape before."""
    m = ServerMetrics()
    calls = {
        "open": (m.session_opened, "streamvlm_sessions_opened_total", False),
        "resume": (m.session_resumed, "streamvlm_sessions_resumed_total", False),
        "refuse": (m.session_refused, "streamvlm_sessions_refused_total", True),
        "close": (m.session_closed, "streamvlm_sessions_closed_total", True),
        "frame": (m.frame_received, "streamvlm_frames_received_total", False),
        "drop": (m.frame_dropped, "streamvlm_frames_dropped_total", True),
        "read": (m.frame_read, "streamvlm_frames_read_total", False),
        "alert": (m.alert, "streamvlm_alerts_total", False),
        "error": (m.protocol_error, "streamvlm_protocol_errors_total", True),
        "fault": (m.engine_fault, "streamvlm_engine_faults_total", True),
        "ttft": (m.first_token, "streamvlm_time_to_first_token_seconds_count", False),
    }
    labels = {"streamvlm_sessions_refused_total": "reason", "streamvlm_sessions_closed_total": "reason",
              "streamvlm_frames_dropped_total": "reason", "streamvlm_protocol_errors_total": "code",
              "streamvlm_engine_faults_total": "kind"}
    expected: dict[tuple[str, tuple], float] = {}
    previous: dict[tuple[str, tuple], float] = {}
    for outcome, label in outcomes:
        if outcome == "answer":
            trigger = "user" if label == "x" else "watch"
            m.response_done("failed", trigger)
            key = ("streamvlm_responses_total", (("status", "failed"), ("trigger", trigger)))
        else:
            call, name, labelled = calls[outcome]
            args = (0.3,) if outcome == "ttft" else (label,) if labelled else ()
            call(*args)
            key = (name, ((labels[name], label),) if labelled else ())
        expected[key] = expected.get(key, 0) + 1
        now = scrape(m)
        for k, v in previous.items():
            if k[0].endswith(("_total", "_count", "_bucket")):
                assert now[k] >= v, k
        for k, v in expected.items():
            assert now[k] == v, k
        previous = now


def test_two_servers_never_share_a_value():
    first, second = ServerMetrics(), ServerMetrics()
    first.session_opened()
    first.frame_dropped("rate_limited", 5)
    first.first_token(0.2)
    a, b = scrape(first), scrape(second)
    assert a[("streamvlm_sessions_opened_total", ())] == 1
    assert b[("streamvlm_sessions_opened_total", ())] == 0
    assert a[("streamvlm_frames_dropped_total", (("reason", "rate_limited"),))] == 5
    assert ("streamvlm_frames_dropped_total", (("reason", "rate_limited"),)) not in b
    assert b[("streamvlm_time_to_first_token_seconds_count", ())] == 0


def test_histograms_use_seconds_buckets_and_every_response_series_exists_from_the_start():
    m = ServerMetrics()
    samples = scrape(m)
    for status in ("completed", "cancelled", "incomplete", "failed"):
        assert samples[("streamvlm_responses_total", (("status", status), ("trigger", "user")))] == 0
    assert samples[("streamvlm_engine_faults_total", (("kind", "session"),))] == 0
    m.first_token(0.3)
    m.first_token(7.0)
    samples = scrape(m)
    bucket = lambda le: samples[("streamvlm_time_to_first_token_seconds_bucket", (("le", le),))]  # noqa: E731
    assert bucket("0.25") == 0 and bucket("0.5") == 1 and bucket("10.0") == 2 and bucket("+Inf") == 2
    assert samples[("streamvlm_time_to_first_token_seconds_sum", ())] == 7.3
    assert len([k for k in samples if k[0] == "streamvlm_time_to_first_token_seconds_bucket"]) == len(TTFT_BUCKETS) + 1


def test_openmetrics_when_the_scraper_asks_for_it():
    m = ServerMetrics()
    m.alert()
    body, content_type = m.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")
    assert "streamvlm_alerts_total 1.0" in body.decode()


def test_admission_by_compute_is_visible_before_and_while_it_limits():
    m = ServerMetrics()
    samples = scrape(m)
    assert samples[("streamvlm_frames_dropped_total", (("reason", "compute"),))] == 0  # rate() works from the start
    assert samples[("streamvlm_sessions_read_limited", ())] == 0 and samples[("streamvlm_read_capacity_fps", ())] == 0
    m.read_admission(3, 1.6)
    m.frame_dropped("compute", 4)
    samples = scrape(m)
    assert samples[("streamvlm_sessions_read_limited", ())] == 3
    assert samples[("streamvlm_read_capacity_fps", ())] == 1.6
    assert samples[("streamvlm_frames_dropped_total", (("reason", "compute"),))] == 4
    m.read_admission(0, None)  # the load went away: the gauge says so, the counter keeps its count
    samples = scrape(m)
    assert samples[("streamvlm_sessions_read_limited", ())] == 0
    assert samples[("streamvlm_frames_dropped_total", (("reason", "compute"),))] == 4
