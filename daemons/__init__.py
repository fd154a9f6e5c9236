"""disagg: daemons for disaggregated prefill/decode serving with vLLM and LMCache."""

__version__ = "0.1.0"

DAEMON_NAMES = ("lmcache-server", "prefill-worker", "decode-worker")
