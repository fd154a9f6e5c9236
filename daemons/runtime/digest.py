"""A digest of what the three daemons must agree on for KV to be reusable.

A decode engine that reads KV written by a different model (same name, other
weights) silently produces different tokens, so the digest covers the model's
identity, not just its name: config.json, the tokenizer files, and the size and
first MiB of every weights file (enough to tell random-weight models apart
without hashing gigabytes at every start), plus the KV dtype and LMCache's
chunking and address, and, on several hosts, the cluster's layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from daemons.config import Config

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


def config_digest(config: Config) -> str:
    """Short hex digest of the settings that must match across the daemons."""
    parts = {
        "model": model_fingerprint(config.model.path),
        "load_format": config.model.load_format,
        "dtype": config.model.dtype,
        "lmcache": {
            "backend": config.lmcache.backend,
            "address": f"{config.lmcache.host}:{config.lmcache.port}",
            "chunk_size": config.lmcache.chunk_size,
        },
    }
    if config.cluster is not None:  # every host must run the same layout
        parts["cluster"] = config.cluster.model_dump(mode="json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
