"""Token ids -> text deltas for streaming, with OpenAI's ``stop`` strings.

The whole completion is decoded again at every step (byte-level BPE merges across token borders, and
a token may end inside a UTF-8 character), and only the new *safe* text is released: text that
ends in an incomplete character (U+FFFD) or could still be the start of a stop string is held back.
When a stop string appears the text is cut just before it and generation should end
(``finish_reason = "stop"``), as in OpenAI's and vLLM's servers.
"""

from __future__ import annotations

from collections.abc import Callable


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` may still become a stop string (or a character)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


class TextStream:
    """Incremental detokenizer of one completion (module docstring)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None) -> None:
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add generated ids; returns the newly released text (sets ``stopped`` on a stop string)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        full = self.decode(self.ids)
        # a stop string can only start where released text may still end (len(text) - longest stop)
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        cuts = [i for i in (full.find(s, search_from) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._release(full[: min(cuts)])
        return self._release(full[: len(full) - held_back(full, self.stops)])

    def finish(self) -> str:
        """The held-back rest once generation has ended without a stop string."""
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
