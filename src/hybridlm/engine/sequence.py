"""One request inside the engine: its tokens, where it stands, its text and when it stops."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor

from hybridlm.engine.prefix_cache import PrefixHasher
from hybridlm.engine.requests import Completion, SamplingParams, TokenLogprob
from hybridlm.generation import sample
from hybridlm.tokenizer import Decoder, IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILLING = "prefilling"  # has a slot; prompt tokens still to compute
    DECODING = "decoding"  # the prompt is in the slot; one token per step
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Decoder,
        eos_token_id: int | None,
        emit: Callable[[Completion], None],
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.eos_token_id = eos_token_id
        self.emit = emit
        self.status = Status.WAITING
        self.slot = -1
        self.computed = 0  # prompt tokens the slot holds
        self.cached_tokens = 0  # of those, restored from the prefix cache
        self.cut_points: list[int] = []  # prompt lengths where a prefill piece must end (prefix snapshots)
        self.hasher: PrefixHasher | None = None
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.abort_requested = False
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # CPU: sampling runs on the host's copy
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._text = ""  # every character decoded so far
        self._sent = 0  # characters of it already emitted (the rest may be the start of a stop string)
        self.arrived_at = time.perf_counter()
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def last_token(self) -> int:
        return self.output[-1]

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.computed

    # -- sampling ----------------------------------------------------------------------------------
    def choose(self, logits: Tensor, greedy_choice: int) -> int:
        """The next token from this sequence's logits [vocab] (``greedy_choice``: their argmax, batched)."""
        p = self.params
        if p.temperature == 0:
            return greedy_choice
        return int(sample(logits[None].cpu(), p.temperature, p.top_k_limit, p.top_p, self.generator)[0])

    def logprob_of(self, logits: Tensor, token: int) -> TokenLogprob | None:
        if self.params.logprobs is None:
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = {}
        if self.params.logprobs > 0:
            values, ids = logprobs.topk(self.params.logprobs)
            top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token, float(logprobs[token]), top)

    # -- output ------------------------------------------------------------------------------------
    def append(self, token: int, logprob: TokenLogprob | None) -> None:
        """Take one generated token: emit the text it completes, and finish if it ends the request."""
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.output.append(token)
        ends = token in self.params.stop_token_ids or (token == self.eos_token_id and not self.params.ignore_eos)
        if ends:  # the stop token's text is not part of the completion (OpenAI, vLLM)
            self._emit(token, "", logprob)
            self.finish("stop")
            return
        self._text += self._detokenizer.add(token)
        stop_at = self._find_stop()
        if stop_at is not None:
            self._emit(token, self._text[self._sent : stop_at], logprob)
            self.finish("stop", flush=False)  # what follows the stop string is not part of the completion
            return
        self._emit(token, self._releasable_text(), logprob)
        if len(self.output) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        """End the request with ``reason``; with ``flush``, the text held back so far goes out with it."""
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        text = ""
        if flush:
            self._text += self._detokenizer.finish()
            text = self._text[self._sent :]
        self.emit(self._completion(None, text, reason, None))

    def _emit(self, token: int, text: str, logprob: TokenLogprob | None) -> None:
        self._sent += len(text)
        self.emit(self._completion(token, text, None, logprob))

    def _completion(self, token: int | None, text: str, reason: str | None, logprob: TokenLogprob | None) -> Completion:
        return Completion(
            self.request_id,
            token,
            text,
            reason,
            logprob,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.output),
            cached_tokens=self.cached_tokens,
        )

    def _find_stop(self) -> int | None:
        """Where the first stop string starts in the text not yet emitted (None: no stop string there)."""
        found = None
        for stop in self.params.stop:
            at = self._text.find(stop, max(0, self._sent - len(stop) + 1))
            if at != -1 and (found is None or at < found):
                found = at
        return found

    def _releasable_text(self) -> str:
        """The new text, less any tail that could still grow into a stop string (held back until it
        cannot: vLLM does the same, so a stream never shows part of a stop string)."""
        hold = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, len(self._text) - self._sent), 0, -1):
                if self._text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return self._text[self._sent : len(self._text) - hold]
