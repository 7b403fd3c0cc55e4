"""A request's text as its tokens come (the engine keeps one per request when it has a
tokenizer): what may be shown now, and where a stop string ends the request.

Text shown is never taken back: a piece that may be the start of a stop string still to
come, or half a UTF-8 character, waits for the next tokens. A stop string ends the
request at the token that completes it; the text ends just before it.
"""

from __future__ import annotations

from typing import Callable, Sequence


class Detokenizer:
    def __init__(self, text_of: Callable[[list[int]], str], stops: Sequence[str] = ()):
        """text_of(token ids) decodes a whole output; stops are the request's stop strings."""
        self.text_of, self.stops = text_of, list(stops)
        self.tokens: list[int] = []
        self.text, self.shown, self.stopped = "", 0, False

    def take(self, new: list[int], final: bool = False) -> tuple[str, int]:
        """Add a step's tokens (`final`: the request's last). Returns the text that may be
        shown now, and how many of the tokens count: all of them, or those up to the one
        that completed a stop string (then `stopped`, and the request is done)."""
        used = len(new)
        if self.stops:  # token by token: the stop ends at the token that completes it
            for i, token in enumerate(new):
                self.tokens.append(token)
                self.text = self.text_of(self.tokens)
                hits = [self.text.find(stop) for stop in self.stops if stop in self.text]
                if hits:
                    self.text, self.stopped, used = self.text[: min(hits)], True, i + 1
                    break
        else:
            self.tokens += new
            self.text = self.text_of(self.tokens)
        done = final or self.stopped
        safe = len(self.text) if done else _safe_length(self.text, self.stops)
        if not done and self.text[:safe].endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            safe -= 1
        delta, self.shown = self.text[self.shown : safe], max(self.shown, safe)
        return delta, used


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` cannot be the start of a stop string still to come."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return len(text) - hold
