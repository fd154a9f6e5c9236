"""Writes disagg-dashboard.json next to this file: `python deploy/grafana/build_dashboard.py`.

Every panel's query uses only metrics the daemons export (tests/e2e/test_observability.py
runs each one against a real Prometheus scraping the real daemons).
"""

from __future__ import annotations

import json
from pathlib import Path

RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[dict]:
    return [
        q(f"histogram_quantile({x}, sum by (le) (rate({metric}_bucket{selector}[{RI}])))", f"p{int(x * 100)}")
        for x in qs
    ]


# (title, unit, targets[, "stack"]): a "stack" panel stacks its series.
ROWS: list[tuple[str, list[tuple]]] = [
    ("Front door", [
        ("Requests per second by status", "reqps", [q(f"sum by (status) (rate(disagg_requests_total[{RI}]))", "{{status}}")]),
        ("Time to first token (incl. prefill call)", "s", quantiles("disagg_time_to_first_token_seconds")),
        ("Inter-token latency", "s", quantiles("disagg_inter_token_latency_seconds", qs=(0.5, 0.99))),
        ("End-to-end latency", "s", quantiles("disagg_request_duration_seconds", qs=(0.5, 0.99))),
        ("Errors per second by kind", "reqps", [q(f"sum by (kind) (rate(disagg_request_errors_total[{RI}]))", "{{kind}}")]),
        ("Requests in flight", "short", [q("sum(disagg_requests_in_flight)", "in flight")]),
        ("Prompt tokens in flight: at prefill / computed on decode (overflow)", "short",
         [q("sum by (where) (disagg_prompt_tokens_in_flight)", "{{where}}")]),
    ]),
    ("Where the time went (Server-Timing stages)", [
        # Means add up (quantiles do not): stacked, read + queue + prefill + decode is the mean time to first token.
        ("Mean time to first token by stage (stacked)", "s", [
            q(f'sum(rate(disagg_request_stage_seconds_sum{{stage="{st}"}}[{RI}])) '
              f'/ sum(rate(disagg_request_stage_seconds_count{{stage="ttft"}}[{RI}]))', st)
            for st in ("read", "queue", "prefill", "decode")], "stack"),
        ("Stage p99", "s", [
            q(f'histogram_quantile(0.99, sum by (le, stage) (rate(disagg_request_stage_seconds_bucket[{RI}])))',
              "{{stage}}")]),
        ("Of prefill: waiting for LMCache to hold the KV (mean)", "s", [
            q(f'sum(rate(disagg_request_stage_seconds_sum{{stage="store"}}[{RI}])) '
              f'/ sum(rate(disagg_request_stage_seconds_count{{stage="store"}}[{RI}]))', "store")]),
    ]),
    ("KV path", [
        ("KV cross-checks per second (greedy requests: decode's first token vs prefill's own)", "reqps",
         [q(f"sum by (result) (rate(disagg_kv_crosschecks_total[{RI}]))", "{{result}}")]),
        ("KV path canary (1 = KV flows prefill -> LMCache -> decode)", "short",
         [q("min(disagg_kv_path_ok)", "canary ok")]),
        ("Canaries per second by result (ok, or the hop that broke)", "reqps",
         [q(f"sum by (result) (rate(disagg_kv_path_canaries_total[{RI}]))", "{{result}}")]),
        ("Requests per second by path (disaggregated / recomputed / fallback)", "reqps",
         [q(f"sum by (path) (rate(disagg_request_paths_total[{RI}]))", "{{path}}")]),
        ("Prefill: wait for LMCache to hold the KV", "s",
         quantiles("disagg_prefill_store_wait_seconds", qs=(0.5, 0.99))),
        ("KV reuse ratio (prompt tokens from LMCache)", "percentunit", [q("disagg:kv_reuse_ratio:rate5m", "reuse")]),
        ("Prompt tokens per second: reused vs computed", "short",
         [q(f"sum by (source) (rate(disagg_prompt_tokens_total[{RI}]))", "{{source}}")]),
        ("Fallbacks per second by reason", "reqps", [q(f"sum by (reason) (rate(disagg_fallbacks_total[{RI}]))", "{{reason}}")]),
        ("Prefill call latency (decode -> prefill-worker)", "s",
         quantiles("disagg_prefill_call_duration_seconds", '{outcome="ok"}', (0.5, 0.99))),
        ("Tokens prefilled per second (prefill-worker)", "short", [q(f"sum(rate(disagg_prefill_tokens_total[{RI}]))", "tokens/s")]),
        ("LMCache L1 memory", "bytes", [q("sum(lmcache_mp_l1_memory_usage_bytes)", "used")]),
        ("LMCache L1 usage (of the cap)", "percentunit", [q("max(lmcache_mp_l1_usage_ratio)", "usage")]),
        ("LMCache lookups: hit vs requested tokens per second", "short", [
            q(f"sum(rate(lmcache_mp_lookup_hit_tokens_total[{RI}]))", "hit"),
            q(f"sum(rate(lmcache_mp_lookup_requested_tokens_total[{RI}]))", "requested"),
        ]),
        ("LMCache restarts in place by reason (lmcache-server)", "short",
         [q(f"sum by (reason) (increase(disagg_lmcache_restarts_total[{RI}]))", "{{reason}}")]),
        ("LMCache unanswered for (health check and request queue)", "s",
         [q("max(disagg_lmcache_unanswered_seconds)", "unanswered")]),
        ("LMCache chunks written / read per second", "short", [
            q(f"sum(rate(lmcache_mp_l1_write_chunks_total[{RI}]))", "written"),
            q(f"sum(rate(lmcache_mp_l1_read_chunks_total[{RI}]))", "read"),
        ]),
    ]),
    ("Engines", [
        ("Requests running / waiting", "short", [
            q('sum by (daemon) (vllm_num_requests_running)', "{{daemon}} running"),
            q('sum by (daemon) (vllm_num_requests_waiting)', "{{daemon}} waiting"),
        ]),
        ("Engine KV cache usage", "percentunit", [q('max by (daemon) (vllm_kv_cache_usage_perc)', "{{daemon}}")]),
        ("Engine prompt tokens per second", "short",
         [q(f'sum by (daemon) (rate(vllm_prompt_tokens_total[{RI}]))', "{{daemon}}")]),
        ("Decode engine: prefix tokens hit externally (LMCache) per second", "short",
         [q(f'sum by (daemon) (rate(vllm_external_prefix_cache_hits_total[{RI}]))', "{{daemon}}")]),
    ]),
    ("Readiness", [
        ("Ready (1) by daemon", "short", [q("max by (daemon) (disagg_ready)", "{{daemon}}")]),
        ("Scrape up by daemon", "short", [q('max by (daemon) (up{job="disagg"})', "{{daemon}}")]),
        ("Starts (restarts + 1)", "short", [q("max by (daemon) (disagg_starts)", "{{daemon}}")]),
        ("Start to ready", "s", [q("max by (daemon) (disagg_readiness_seconds)", "{{daemon}}")]),
    ]),
]


def build() -> dict:
    panels: list[dict] = []
    pid = 1
    y = 0
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, (ptitle, unit, targets, *style) in enumerate(row):
            defaults: dict = {"unit": unit}
            if "stack" in style:
                defaults["custom"] = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60}
            panels.append({
                "type": "timeseries", "title": ptitle, "id": pid, "datasource": DS,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [{**t, "refId": chr(ord("A") + j), "datasource": DS} for j, t in enumerate(targets)],
            })
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "uid": "disagg-overview",
        "title": "disagg: disaggregated prefill/decode",
        "tags": ["disagg", "vllm", "lmcache"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0,
        }]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("disagg-dashboard.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
