"""Streaming detokenization: token ids in, text deltas out, stop strings cut off."""
from __future__ import annotations

from leanserve.models.tokenizer import Tokenizer

PROMPT_CONTEXT = 6  # prompt tokens decoded as context for the first generated ones


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that concatenate to the final text.

    A token's text depends on its neighbours (SentencePiece drops the leading space of a text's first
    token; byte-level tokens may hold half a UTF-8 character), so each step decodes a small window:
    `ids[prefix:read]` is context whose text was already taken, and `decode(ids[prefix:])` minus
    `decode(ids[prefix:read])` is what the tokens after `read` add. The window moves on once
    those tokens decode to complete characters, so a step costs O(window), not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix, self._read = 0, len(self._ids)
        self._taken = 0  # characters of the text after `read` already taken (a complete-character prefix)
        self._stops = [s for s in stop if s]
        self._held = ""  # taken but not yet emitted, because it may be the start of a stop string
        self._emitted: list[str] = []

    def add(self, token_id: int) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string matched or None). After a match, stop calling."""
        self._ids.append(token_id)
        self._held += self._take(final=False)
        hits = [(self._held.find(s), s) for s in self._stops if s in self._held]
        if hits:
            index, stop = min(hits, key=lambda hit: hit[0])
            text, self._held = self._held[:index], ""
            self._emitted.append(text)
            return text, stop
        keep = self._stop_prefix_length()
        text, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        self._emitted.append(text)
        return text, None

    def flush(self) -> str:
        """On finish without a stop string: everything held back, including a trailing U+FFFD."""
        text, self._held = self._held + self._take(final=True), ""
        self._emitted.append(text)
        return text

    @property
    def output_text(self) -> str:
        return "".join(self._emitted)

    def _take(self, final: bool) -> str:
        """New complete characters since the last call; with `final`, incomplete ones too."""
        context = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip_special)
        text = self._tokenizer.decode(self._ids[self._prefix:], self._skip_special)[len(context):]
        complete = text if final else text.rstrip("\ufffd")  # an unfinished UTF-8 sequence decodes to U+FFFD
        new = complete[self._taken:]
        if complete and complete == text:  # all of it is out: slide the window
            self._prefix, self._read, self._taken = self._read, len(self._ids), 0
        else:
            self._taken = len(complete)
        return new

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that a stop string starts with."""
        held = self._held
        return max((k for s in self._stops for k in range(1, min(len(s), len(held) + 1))
                    if held.endswith(s[:k])), default=0)
