"""The arithmetic of the goodput benchmark (benchmarks/goodput.py): each request's TTFT and ITL quantiles,
attainment of an SLO over a sweep point, goodput over a sweep. Unit-tested apart from the load."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

ATTAIN = 0.9
REQUEST_FIELDS = ("ttft", "itl_p50", "itl_p90", "itl_p99", "itl_max")


@dataclass
class Result:
    ok: bool = False
    ttft: float = float("nan")
    itls: list[float] = field(default_factory=list)
    cached: int = 0
    path: str = ""
    error: str = ""

    def itl_qs(self, qs: tuple[float, ...]) -> list[float]:
        """This request's own inter-token latency quantiles, from one sort (0 when it produced one token)."""
        if not self.itls:
            return [0.0] * len(qs)
        s = sorted(self.itls)
        return [s[int(q * (len(s) - 1))] for q in qs]

    def itl_p90(self) -> float:
        return self.itl_qs((0.9,))[0]


def summarize(results: list[Result], ttft_s: float, itl_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    attained = [r for r in ok if r.ttft <= ttft_s and r.itl_p90() <= itl_s]

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        s = sorted(values)
        return round(s[int(q * (len(s) - 1))], 4)

    ttfts = [r.ttft for r in ok]
    itl_p90s = [r.itl_p90() for r in ok]
    all_itls = [x for r in ok for x in r.itls]
    paths: dict[str, int] = {}
    for r in results:
        paths[r.path or "-"] = paths.get(r.path or "-", 0) + 1
    errors = [r.error for r in results if r.error]
    return {
        "sent": len(results), "ok": len(ok), "attainment": round(len(attained) / len(results), 3) if results else 0,
        "ttft_p50": pct(ttfts, 0.5), "ttft_p90": pct(ttfts, 0.9), "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(all_itls, 0.5), "itl_p99": pct(all_itls, 0.99),
        "request_itl_p90_median": round(statistics.median(itl_p90s), 4) if itl_p90s else float("nan"),
        "met_ttft": sum(1 for r in ok if r.ttft <= ttft_s), "met_itl": sum(1 for r in ok if r.itl_p90() <= itl_s),
        "cached_tokens_median": statistics.median([r.cached for r in ok]) if ok else 0,
        "paths": paths, "errors": errors[:3], "n_errors": len(errors),
        # per request (TTFT s and its own ITL p50, p90, p99, max in s; null when it failed): attainment
        # for other targets, later (--plot --slo)
        "request_fields": list(REQUEST_FIELDS),
        "requests": [[round(r.ttft, 4)] + [round(x, 4) for x in r.itl_qs((0.5, 0.9, 0.99, 1.0))] if r.ok else None
                     for r in results],
    }


def attainment_for(point: dict[str, Any], ttft_s: float, itl_field: str, itl_s: float) -> float:
    """The point's attainment under another SLO, from its per-request numbers (its own when it has none)."""
    fields = point.get("request_fields")
    if not fields or itl_field not in fields:
        if itl_field == "itl_p90" and ttft_s == point["ttft_target_s"] and itl_s == point["itl_target_s"]:
            return point["attainment"]
        raise ValueError(f"this point has no per-request {itl_field} (measured before it was recorded)")
    i = fields.index(itl_field)
    reqs = point["requests"]
    met = sum(1 for r in reqs if r is not None and r[0] <= ttft_s and r[i] <= itl_s)
    return round(met / len(reqs), 3) if reqs else 0.0


def parse_slo(text: str) -> tuple[float, str, float]:
    """'2:p90:0.05' -> (TTFT target s, per-request ITL statistic, ITL target s)."""
    ttft, stat, itl = text.split(":")
    field = f"itl_{stat}"
    if field not in REQUEST_FIELDS:
        raise ValueError(f"ITL statistic must be one of p50, p90, p99, max, not {stat!r}")
    return float(ttft), field, float(itl)


def with_slo(points: list[dict[str, Any]], slo: tuple[float, str, float]) -> list[dict[str, Any]]:
    return [dict(p, attainment=attainment_for(p, *slo)) for p in points]


def by_rate(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(rate, worst attainment measured at that rate), ascending: a rate measured twice counts its worse run."""
    worst: dict[float, float] = {}
    for p in points:
        worst[p["rate"]] = min(worst.get(p["rate"], 1.0), p["attainment"])
    return sorted(worst.items())


def goodput(points: list[dict[str, Any]]) -> float:
    """The highest swept rate whose attainment (and every lower rate's) is >= 90 %."""
    best = 0.0
    for rate, attainment in by_rate(points):
        if attainment < ATTAIN:
            break
        best = rate
    return best


def goodput_text(points: list[dict[str, Any]]) -> str:
    """Goodput as a reader should see it: below the lowest swept rate is not 0, it is unknown below it."""
    g = goodput(points)
    if g == 0 and points:
        return f"< {min(p['rate'] for p in points):g} req/s"
    return f"{g:g} req/s"


def slo_title(slo: tuple[float, str, float]) -> str:
    ttft, field, itl = slo
    return f"TTFT <= {ttft:g} s, ITL {field[4:]} <= {1000 * itl:.0f} ms"
