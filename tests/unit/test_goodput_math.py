"""benchmarks/goodput.py's arithmetic: attainment under another SLO, goodput over a sweep."""

from __future__ import annotations

import pytest

from benchmarks.harness.goodput_math import (
    REQUEST_FIELDS,
    Result,
    attainment_for,
    goodput,
    parse_slo,
    summarize,
    with_slo,
)


def point(rate: float, requests: list[list[float] | None], attainment: float = 0.0) -> dict:
    return {"rate": rate, "ttft_target_s": 2.0, "itl_target_s": 0.1, "attainment": attainment,
            "request_fields": list(REQUEST_FIELDS), "requests": requests}


def test_a_request_attains_only_when_both_targets_hold_and_a_failed_one_never_does() -> None:
    p = point(1, [[0.5, 0.01, 0.02, 0.03, 0.2],    # fast, one stall: meets p90 and p99, not max <= 0.1
                  [2.5, 0.01, 0.02, 0.03, 0.04],   # TTFT too slow
                  [0.5, 0.01, 0.02, 0.12, 0.3],    # p99 stall
                  None])                            # failed
    assert attainment_for(p, *parse_slo("2:p90:0.1")) == 0.5
    assert attainment_for(p, *parse_slo("2:p99:0.1")) == 0.25
    assert attainment_for(p, *parse_slo("2:max:0.1")) == 0.0
    assert attainment_for(p, *parse_slo("3:p90:0.1")) == 0.75


def test_goodput_is_the_highest_rate_with_every_lower_rate_attaining_too() -> None:
    ok, bad = [0.1, 0.01, 0.01, 0.01, 0.01], [5.0, 0.01, 0.01, 0.01, 0.01]
    pts = [point(1, [ok] * 10), point(2, [ok] * 9 + [bad]), point(4, [ok] * 8 + [bad] * 2), point(8, [ok] * 10)]
    assert goodput(with_slo(pts, parse_slo("2:p90:0.1"))) == 2  # 8 attains, but 4 did not: goodput stops at 2
    # a rate measured twice counts its worse run
    assert goodput(with_slo(pts[:2] + [point(2, [bad] * 10)], parse_slo("2:p90:0.1"))) == 1


def test_points_from_before_per_request_itls_answer_only_their_own_slo() -> None:
    old = {"rate": 1, "ttft_target_s": 2.0, "itl_target_s": 0.1, "attainment": 0.93, "requests": [[0.1, 0.02]]}
    assert attainment_for(old, 2.0, "itl_p90", 0.1) == 0.93
    with pytest.raises(ValueError, match="no per-request itl_p99"):
        attainment_for(old, 2.0, "itl_p99", 0.1)


def test_slo_text_is_checked() -> None:
    assert parse_slo("1.5:max:0.2") == (1.5, "itl_max", 0.2)
    with pytest.raises(ValueError, match="one of p50, p90, p99, max"):
        parse_slo("2:p95:0.1")


def test_summary_records_each_requests_own_itl_quantiles() -> None:
    r = Result(ok=True, ttft=0.3, itls=[0.01] * 98 + [0.2, 0.5])
    s = summarize([r, Result(error="HTTP 503")], 2.0, 0.1)
    assert s["sent"] == 2 and s["ok"] == 1 and s["attainment"] == 0.5
    assert s["requests"][1] is None
    ttft, p50, p90, p99, mx = s["requests"][0]
    assert (ttft, p50, p90, mx) == (0.3, 0.01, 0.01, 0.5) and p99 == 0.2


def test_a_sweep_failing_at_its_lowest_rate_says_so_instead_of_zero() -> None:
    from benchmarks.harness.goodput_math import goodput_text

    bad = [5.0, 0.01, 0.01, 0.01, 0.01]
    slo = parse_slo("2:p90:0.1")
    assert goodput_text(with_slo([point(32, [bad] * 10), point(40, [bad] * 10)], slo)) == "< 32 req/s"
    assert goodput_text(with_slo([point(1, [[0.1, 0.01, 0.01, 0.01, 0.01]] * 10)], slo)) == "1 req/s"
