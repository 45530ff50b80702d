"""The streamer `opt generate` hands to every backend's `generate(streamer=...)`.

Hugging Face's interface: `put(tokens)` is called first with the prompt [B, T], then once per
step with that step's new tokens [B]; `end()` once at the end. The same object also times the
tokens as they arrive, so the reported rate covers decoding only (after the first new token:
no prefill, no tracing or XLA compilation).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np


def _as_numpy(tokens: Any) -> np.ndarray:
    if hasattr(tokens, "detach"):  # torch
        tokens = tokens.detach().cpu()
    return np.asarray(tokens).reshape(-1)


class TextStreamer:
    """Prints row 0's decoded text as tokens arrive (when `out` is given) and records when each came.

    Decodes everything generated so far and prints the new suffix, holding back while the text ends
    in an incomplete UTF-8 sequence (byte-level BPE can split a character across tokens). Stops
    printing at `eos_token_id`.
    """

    def __init__(self, tokenizer: Any, eos_token_id: int | None, out: Any = None):
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.out = out
        self.ids: list[int] = []
        self.times: list[float] = []
        self.printed = 0
        self.started = False
        self.done = False
        self.ended = False

    def put(self, tokens: Any) -> None:
        if not self.started:  # the first call carries the prompt
            self.started = True
            return
        self.times.append(time.perf_counter())
        if self.done:
            return
        token = int(_as_numpy(tokens)[0])
        if self.eos is not None and token == self.eos:
            self.done = True
            return
        self.ids.append(token)
        if self.out is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    __call__ = put  # backends that call the streamer itself

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.out is not None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self.out.write(text[self.printed :] + "\n")
            self.out.flush()

    @property
    def streamed(self) -> bool:
        """True once the backend delivered at least one new token through the streamer."""
        return bool(self.times)

    def decode_rate(self) -> tuple[int, float] | None:
        """(tokens, tokens/s) from the first new token to the last; None with fewer than two tokens."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        n = len(self.times) - 1
        return n, n / (self.times[-1] - self.times[0])


def stdout_streamer(tokenizer: Any, eos_token_id: int | None) -> TextStreamer:
    return TextStreamer(tokenizer, eos_token_id, out=sys.stdout)
