"""Re-exposed engine/LMCache metrics are filtered by family prefix."""

from daemons.runtime.exposition import filter_families

TEXT = """# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# HELP process_cpu_seconds_total Total user and system CPU time
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 3.0
vllm:e2e_request_latency_seconds_bucket{le="0.3"} 1.0
"""


def test_keeps_only_the_prefixed_families():
    out = filter_families(TEXT, ("vllm:",))
    assert "python_gc" not in out and "process_cpu" not in out
    assert out.count("\n") == 4
    assert out.splitlines()[2].startswith("vllm:num_requests_running{")


def test_renames_and_drops_created():
    text = TEXT + "vllm:request_success_created 1.7e9\n"
    out = filter_families(text, ("vllm:",), {"vllm:": "vllm_"})
    assert "vllm:" not in out and "_created" not in out
    assert "# TYPE vllm_num_requests_running gauge" in out
    assert 'vllm_num_requests_running{engine="0",model_name="m"} 0.0' in out


def test_non_counter_loses_total_suffix():
    text = """# HELP vllm:iteration_tokens_total Number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{le="1.0"} 3.0
vllm:iteration_tokens_total_count 3.0
vllm:iteration_tokens_total_sum 9.0
# HELP vllm:prompt_tokens_total Prompt tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total 12.0
"""
    out = filter_families(text, ("vllm:",), {"vllm:": "vllm_"})
    assert "# TYPE vllm_iteration_tokens histogram" in out
    assert 'vllm_iteration_tokens_bucket{le="1.0"} 3.0' in out and "vllm_iteration_tokens_sum 9.0" in out
    assert "vllm_prompt_tokens_total 12.0" in out and "# TYPE vllm_prompt_tokens_total counter" in out


def test_empty_input():
    assert filter_families("", ("vllm:",)) == ""
