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
        ("Decode engine up (0: requests fail over to prefill engines)", "short",
         [q("min(disagg_decode_engine_up)", "decode engine up")]),
        ("Failover in flight, engine reloads, migrations", "short", [
            q("sum(disagg_failover_in_flight)", "failover in flight"),
            q(f"sum by (why) (increase(disagg_sibling_forwards_total[{RI}]))", "to a sibling decode-worker: {{why}}"),
            q(f"sum(increase(disagg_decode_engine_reloads_total[{RI}]))", "engine reloads"),
            q(f"sum by (outcome) (increase(disagg_request_migrations_total[{RI}]))", "migrations {{outcome}}"),
        ]),
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
        ("Build: version, vLLM/LMCache and config digest by daemon (two at once: a roll in progress)", "short",
         [q("max by (daemon, version, engines, config_digest) (disagg_build_info)",
            "{{daemon}} {{version}} ({{engines}}) {{config_digest}}")]),
    ]),
]

# What each panel shows and how to read it (Grafana shows it on the panel's (i) icon). Every panel has one.
DESCRIPTIONS = {
    "Requests per second by status": "Front-door requests by HTTP status: 429 is admission refusing (full), 503 no "
    "engine could serve, 499 the client left.",
    "Time to first token (incl. prefill call)": "Arrival to first token as clients see it, the prefill call included.",
    "Inter-token latency": "Time between streamed tokens: the decode engine's step time as clients see it.",
    "End-to-end latency": "Arrival to the last byte.",
    "Errors per second by kind": "Failed requests by kind (docs/reference/metrics.md lists every kind; runbooks: "
    "DisaggRequestErrors).",
    "Requests in flight": "Requests holding an admission slot now (cap: decode_worker.max_concurrent_requests).",
    "Prompt tokens in flight: at prefill / computed on decode (overflow)": "Estimated prompt tokens in prefill calls, "
    "and those the decode engine computes itself because prefill is backed up (path prefill_busy).",
    "Decode engine up (0: requests fail over to prefill engines)": "0 while the decode engine loads, reloads or does "
    "not answer: requests go whole to prefill engines (path failover). Runbook: DisaggDecodeEngineDown.",
    "Failover in flight, engine reloads, migrations": "Requests served whole by prefill engines now; requests relayed "
    "to a sibling decode-worker (why: engine_down, or load on the box's shared port); decode engine restarts in "
    "place; streams continued on another engine (or not: failed) after theirs broke.",
    "Mean time to first token by stage (stacked)": "Server-Timing's stages, averaged: read + queue + prefill + decode "
    "is the mean time to first token.",
    "Stage p99": "The 99th percentile of each stage: which one makes the tail.",
    "Of prefill: waiting for LMCache to hold the KV (mean)": "How long prefill-worker waits after its engine answered "
    "until LMCache holds the prompt's chunks (bounded by kv_path.store_timeout_s).",
    "KV cross-checks per second (greedy requests: decode's first token vs prefill's own)": "match / near_tie are fine; "
    "any mismatch is KV that means something else (runbook: DisaggKVMismatch).",
    "KV path canary (1 = KV flows prefill -> LMCache -> decode)": "The last canary through every prefill-worker "
    "passed (1) or not (0). Runbook: DisaggKVPathBroken.",
    "Canaries per second by result (ok, or the hop that broke)": "Canary results: ok, or the hop that broke.",
    "Requests per second by path (disaggregated / recomputed / fallback)": "How each answer got its prompt "
    "(x-disagg-path): disaggregated, recomputed, fallback, short_prompt, failover, ...",
    "Prefill: wait for LMCache to hold the KV": "prefill-worker's wait for the store, p50/p99.",
    "KV reuse ratio (prompt tokens from LMCache)": "Share of all prompt tokens the decode engine loaded instead of "
    "computing (short prompts, computed on the decode engine by design, lower it).",
    "Prompt tokens per second: reused vs computed": "Prompt tokens the decode engine loaded from LMCache vs computed.",
    "Fallbacks per second by reason": "Prompts the decode engine computed because prefill was skipped or failed, by "
    "reason. Runbook: DisaggFallbackRateHigh.",
    "Prefill call latency (decode -> prefill-worker)": "The prefill call as the front door sees it (the store wait "
    "included).",
    "Tokens prefilled per second (prefill-worker)": "Prompt tokens the prefill engine computed.",
    "LMCache L1 memory": "LMCache's host memory for KV in use.",
    "LMCache L1 usage (of the cap)": "Share of lmcache.l1_size_gb in use; at the cap LMCache evicts (LRU).",
    "LMCache lookups: hit vs requested tokens per second": "Tokens engines asked LMCache for vs found there.",
    "LMCache restarts in place by reason (lmcache-server)": "LMCache restarted by lmcache-server: unresponsive, "
    "engine_lost, peer_replaced. Runbook: DisaggLMCacheRestarted.",
    "LMCache unanswered for (health check and request queue)": "How long LMCache has failed its health check or a "
    "lookup (restarted in place at lmcache.unresponsive_restart_s).",
    "LMCache chunks written / read per second": "KV chunks stored into and loaded from LMCache's L1.",
    "Requests running / waiting": "Each engine's own queue (vLLM): waiting requests mean a saturated engine.",
    "Engine KV cache usage": "Each engine's GPU KV cache in use.",
    "Engine prompt tokens per second": "Prompt tokens each engine processed (loaded ones included).",
    "Decode engine: prefix tokens hit externally (LMCache) per second": "Prompt tokens the engines loaded from "
    "LMCache (vLLM's own count).",
    "Ready (1) by daemon": "1 while a daemon serves (ready or degraded); disaggctl status says which and why.",
    "Scrape up by daemon": "Prometheus reaches the daemon's metrics port. Runbook: DisaggDaemonDown.",
    "Starts (restarts + 1)": "Times each daemon started with this runtime dir: a rise is a restart. Runbook: "
    "DisaggRestarting.",
    "Start to ready": "Seconds from a daemon's start to its first ready.",
    "Build: version, vLLM/LMCache and config digest by daemon (two at once: a roll in progress)": "One series per "
    "daemon and release: mid-upgrade two versions show; two config digests mean the daemons refuse each other "
    "(runbooks: DisaggVersionSkew, DisaggDigestMismatch).",
}


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
                "type": "timeseries", "title": ptitle, "description": DESCRIPTIONS[ptitle], "id": pid, "datasource": DS,
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
