"""Stop strings: generation ends at the first occurrence of any of them in the output text, which
is cut just before it (OpenAI's semantics: the stop string is not part of the output).

A stop string may span token boundaries, so text that could be the start of one is held back
until the next text shows whether it is; only that much is held, so text otherwise streams as it
comes. Pure state, fed the detokenizer's deltas in order.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...], min_tokens: int = 0):
        self.stops = stops
        self.min_tokens = min_tokens  # none is matched in the text of the first min_tokens tokens
        self.held = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False, num_tokens: int = 0) -> str:
        """The part of `text` (after what was held) that is certainly output; `stopped` turns true
        when a stop string was found (nothing after it is ever output). `final`: no more text
        comes, so nothing is held back. `num_tokens`: the output tokens so far, this text's
        included; below min_tokens no stop string ends in this text, but its end may begin one,
        so that much is still held."""
        if self.stopped:
            return ""
        text = self.held + text
        ends = [i for i in (text.find(s) for s in self.stops) if i >= 0] if num_tokens >= self.min_tokens else []
        if ends:
            self.held, self.stopped = "", True
            return text[: min(ends)]
        keep = 0 if final else self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_suffix(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
