"""What a client asks the engine for and what it gets back, independent of HTTP.

``SamplingParams`` is one request's generation settings (the OpenAI fields the engine acts on);
``check`` refuses a bad one with a ``RequestError`` naming the field, as the server's 400 does.
``Completion`` is one event of a running request: the next token and the text it completes, and
at the end the finish reason and the token counts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

# OpenAI returns at most 20 top logprobs per position (vLLM's default cap is the same)
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class RequestError(ValueError):
    """A request the engine cannot run: ``param`` names the field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound: retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has stopped and takes no new request (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # text that ends the completion (not included in it)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely

    def check(self) -> None:
        """A RequestError naming the first bad field."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise RequestError(f"temperature must be a number in [0, 2], got {self.temperature!r}", "temperature")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}", "top_p")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1 or self.top_k == 0):
            raise RequestError(f"top_k must be an integer >= 1 (or -1 for no limit), got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}", "stop")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}", "stop_token_ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs")

    @property
    def top_k_limit(self) -> int | None:
        """top_k as the sampler takes it: None for no limit (OpenAI-style -1 included)."""
        return None if self.top_k in (None, -1) else self.top_k


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the ``logprobs`` most likely ids -> logprob


@dataclass
class Completion:
    """One event of a request: a new token (``token_id``, ``text`` it completes, may be ''), or the end.

    The last event has ``finish_reason`` set ('stop': EOS, a stop token or a stop string; 'length':
    max_tokens or the context; 'abort': aborted or the engine stopped) and may carry no token.
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not computed


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
