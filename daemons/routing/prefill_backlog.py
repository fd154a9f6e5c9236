"""Prompt tokens waiting on each GPU, and the overflow choice made from them.

One prefill GPU computes every prompt of a disaggregated deployment. When it is
the bottleneck (long prompts, or many short ones) requests queue in front of it
while the decode GPU, which only decodes, has room: TTFT grows past any target
although the box as a whole is not full. Overflow lets the decode engine compute
a prompt itself (path ``prefill_busy``) while

- the prompt tokens of prefill calls in flight (sent, not yet answered) are at
  least ``overflow_backlog_tokens``, and
- the prompt tokens the decode engine is already computing this way (sent to it,
  no first token yet), with this prompt's, stay within ``overflow_max_local_tokens``.

The second bound is the price: a prompt computed on the decode engine stalls every
stream decoding there for the length of that prefill step (what disaggregation
exists to avoid), so it is kept to a few thousand tokens at a time. Both counts are
the front door's own (estimated prompt lengths, :mod:`daemons.routing.prompt_size`); no
engine is asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Backlog:
    """What the front door has in flight, in prompt tokens, at prefill and on the decode engine."""

    def __init__(self, overflow_backlog_tokens: int = 0, overflow_max_local_tokens: int = 0) -> None:
        if overflow_backlog_tokens < 0 or overflow_max_local_tokens < 0:
            raise ValueError("overflow thresholds are token counts >= 0")
        self.overflow_backlog_tokens = overflow_backlog_tokens  # 0: never overflow
        self.overflow_max_local_tokens = overflow_max_local_tokens
        self.prefill_tokens = 0
        self.prefill_calls = 0
        self.local_tokens = 0

    def overflow(self, prompt_tokens: int) -> bool:
        """Should the decode engine compute this prompt because prefill is backed up?"""
        return (self.overflow_backlog_tokens > 0
                and self.prefill_tokens >= self.overflow_backlog_tokens
                and self.local_tokens + prompt_tokens <= self.overflow_max_local_tokens)

    @contextmanager
    def at_prefill(self, prompt_tokens: int) -> Iterator[None]:
        """Count a prefill call's prompt while the call is in flight."""
        self.prefill_tokens += prompt_tokens
        self.prefill_calls += 1
        try:
            yield
        finally:
            self.prefill_tokens -= prompt_tokens
            self.prefill_calls -= 1

    @contextmanager
    def on_decode(self, prompt_tokens: int) -> Iterator[None]:
        """Count an overflowed prompt until the decode engine's first token (or answer)."""
        self.local_tokens += prompt_tokens
        try:
            yield
        finally:
            self.local_tokens -= prompt_tokens
