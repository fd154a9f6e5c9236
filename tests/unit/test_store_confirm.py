"""prefill-worker's answer to "is the KV stored?" when LMCache cannot say: the log names why (a lookup LMCache did not
answer by the store deadline logged an empty reason: "cannot ask LMCache whether the KV is stored: "), and the answer
claims nothing about the store."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from daemons.prefill_worker import PrefillWorker


class Unanswered:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def wait_stored(self, tokens: list[int], want: int, timeout_s: float) -> int:
        raise self.exc


@pytest.mark.parametrize("exc, said", [
    (TimeoutError(), "no answer within kv_path.store_timeout_s (2s)"),
    (RuntimeError("LMCache lookup client gone: BrokenPipeError()"), "LMCache lookup client gone"),
])
def test_a_store_that_cannot_be_confirmed_says_why(exc: BaseException, said: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    worker = SimpleNamespace(kv=Unanswered(exc), chunk_size=256, store_timeout_s=2.0)
    answer = {"choices": [{"prompt_token_ids": list(range(600))}]}
    with caplog.at_level(logging.WARNING):
        headers = asyncio.run(PrefillWorker.confirm_stored(worker, answer, "r1"))  # type: ignore[arg-type]
    assert headers == {"x-disagg-kv-expected-tokens": "512"}  # nothing said of what is stored
    line = next(r.getMessage() for r in caplog.records if "cannot ask LMCache" in r.getMessage())
    assert said in line, line
