"""Short prompts under load: served start to end by the engine with fewer requests in progress.

Disaggregation pays where loading a prompt's KV costs the decode engine less than
computing it (prompts of ``disaggregate_min_tokens`` and more). Below that, a
prefill call buys nothing but a hop, and one GPU computing every short prompt while
the other decodes every stream serves fewer requests within ITL targets than two
engines that each do both (docs/performance.md: 1,000-token prompts on 2x H100).

With ``balance_short_prompts`` on, a short prompt that arrives under load (more
than ``short_prompt_max_in_flight`` requests in progress) goes whole to the less
busy side: the decode engine (path ``short_prompt``) or a prefill engine (path
``decode_busy``), which computes the prompt and decodes it itself. No KV moves
either way. "Busy" is requests in progress as the front door counts them: the
decode engine holds every request not served whole by a prefill engine and not
waiting on a prefill call; the prefill engines hold those two kinds, shared among
the working ones. The price: streams decoded on a prefill engine share its steps
with the prefill calls of long prompts.
"""

from __future__ import annotations


class EngineShare:
    """Counts the requests served whole by prefill engines and says where the next short prompt goes."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.on_prefill = 0  # requests being served start to end by a prefill engine

    def to_prefill(self, others_in_progress: int, prefill_calls: int, prefills: int) -> bool:
        """Should the next short prompt be served whole by a prefill engine?

        ``others_in_progress``: requests the front door holds besides this one; ``prefill_calls``:
        prefill calls in flight among them; ``prefills``: working prefill engines.
        """
        if not self.enabled or prefills <= 0:
            return False
        on_decode = others_in_progress - self.on_prefill - prefill_calls
        return (self.on_prefill + prefill_calls) / prefills < on_decode

    def taken(self) -> None:
        self.on_prefill += 1

    def released(self) -> None:
        if self.on_prefill <= 0:
            raise RuntimeError("EngineShare.released() without a request on a prefill engine")
        self.on_prefill -= 1
