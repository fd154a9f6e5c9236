"""disagg: daemons for disaggregated prefill/decode serving with vLLM and LMCache."""

__version__ = "0.1.0"


