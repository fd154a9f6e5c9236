"""The vLLM engine flags disagg reads in a config: which GPUs a `device` names, which flags change what the KV
cache holds (every engine must agree on them; they are part of the digest), and which the worker sets itself."""

from __future__ import annotations

# Tensor parallelism comes from `device` (several GPUs): a flag of its own would disagree with it.
TP_FLAGS = ("--tensor-parallel-size", "-tp")


def gpu_indices(device: str) -> list[int]:
    """The GPUs a worker's `device` names: ``cuda:0`` -> [0], ``cuda:0-3`` -> [0, 1, 2, 3], ``cuda:0,2`` -> [0, 2];
    ``cpu`` -> []."""
    if not device.startswith("cuda:"):
        return []
    out: list[int] = []
    for part in device.split(":", 1)[1].split(","):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


# Engine flags that change what the KV cache holds or how it is laid out: every worker's engine must agree on
# them (a decode engine reading fp8 KV as bf16 answers garbage with HTTP 200), and they are part of the digest.
KV_ENGINE_FLAGS = ("--kv-cache-dtype", "--quantization", "-q", "--block-size", "--hf-overrides", "--hf-config-path",
                   "--tokenizer", "--tokenizer-mode", "--revision", "--code-revision", "--tokenizer-revision",
                   "--enable-lora", "--lora-modules", "--max-lora-rank", "--rope-scaling", "--rope-theta",
                   "--model-impl", "--calculate-kv-scales", "--attention-backend")


def kv_engine_args(args: list[str]) -> dict[str, str]:
    """The KV-relevant flags among engine arguments (``--flag value``, ``--flag=value``, ``--flag``), as
    flag -> value ("" for a bare switch); ``-q`` is spelled ``--quantization``, ``_`` as ``-``."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-") if flag.startswith("--") else flag
        if flag in KV_ENGINE_FLAGS:
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
                i += 1
            found["--quantization" if flag == "-q" else flag] = value
        i += 1
    return found


# Engine flags the worker owns: extra_engine_args may not change them.
ENGINE_OWNED_FLAGS = ("--host", "--port", "--uds", "--api-key", "--kv-transfer-config", "--model",
                      "--served-model-name")

