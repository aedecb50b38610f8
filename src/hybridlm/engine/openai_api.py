"""The OpenAI API as the server speaks it: request schemas, their conversion to engine requests, and the
response, chunk and error bodies.

Schemas follow https://platform.openai.com/docs/api-reference (completions and chat completions). An
unknown field is a 400 naming it (``extra="forbid"``); a field of the API that would change the output
but is not implemented (``presence_penalty`` != 0, ``logit_bias``, ``best_of`` > 1, ``suffix``,
``echo``, ``tools``...) is refused by name rather than ignored; fields that change nothing here
(``user``, ``metadata``, ``store``) are accepted. ``top_k``, ``stop_token_ids`` and ``ignore_eos`` are
vLLM's extensions, taken as vLLM takes them.

``n`` > 1 submits n requests for the same prompt (the prefix cache makes the copies cheap); with a
``seed``, choice i samples with ``seed + i`` so the choices differ and choice 0 equals the n=1 answer.
Usage counts the prompt once (as OpenAI does); ``cached_tokens`` is the smallest number of prompt
tokens any choice restored from the prefix cache.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from hybridlm.engine.chat import ChatTemplate
from hybridlm.engine.requests import Completion, RequestError, SamplingParams, TokenLogprob

MAX_CHOICES = 128  # OpenAI's bound on n
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity; vLLM clamps the same way


class _Strict(BaseModel):
    # strict: "16" is not an integer and true is not a number, as in OpenAI's API
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's optional fields are nullable, and many clients send every field, null when unset
        field = cls.model_fields.get(info.field_name or "")
        if value is None and field is not None and not field.is_required():
            return field.get_default(call_default_factory=True)
        return value


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields completions and chat completions share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Any = None  # a string or a list of strings: checked in stop_strings() to name the field
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_GenerationRequest):
    prompt: Any  # a string or a list of token ids: checked in prompt_ids() to name the field
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Any]  # checked by chat.check_messages, which names messages[i].role etc.
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; both taken
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# requests -> engine inputs


def refuse_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """A RequestError naming the first field that asks for something not implemented."""
    refusals: list[tuple[str, bool, str]] = [
        ("presence_penalty", bool(request.presence_penalty), "only 0 is supported"),
        ("frequency_penalty", bool(request.frequency_penalty), "only 0 is supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(request, CompletionRequest):
        refusals += [
            ("echo", request.echo, "echo is not supported"),
            ("best_of", request.best_of not in (None, 1, request.n), "best_of > n is not supported"),
            ("suffix", bool(request.suffix), "suffix (insertion) is not supported"),
        ]
    else:
        response_type = (request.response_format or {}).get("type", "text")
        refusals += [
            ("tools", bool(request.tools), "tool calling is not supported"),
            ("tool_choice", request.tool_choice not in (None, "none", "auto"), "tool calling is not supported"),
            ("functions", bool(request.functions), "function calling is not supported"),
            ("function_call", request.function_call not in (None, "none", "auto"), "function calling is not supported"),
            ("response_format", response_type != "text", "only response_format type 'text' is supported"),
        ]
    for name, is_refused, reason in refusals:
        if is_refused:
            raise RequestError(f"{name}: {reason}", name)
    if not 1 <= request.n <= MAX_CHOICES:
        raise RequestError(f"n must be an integer in [1, {MAX_CHOICES}], got {request.n}", "n")
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")


def prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """A completions prompt as token ids: a string, or a list of token ids. OpenAI also takes a batch
    of prompts; a batch of one is taken (some clients always send one), a larger one refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise RequestError("prompt token ids must be >= 0", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise RequestError("a list of several prompts is not supported: send one request per prompt", "prompt")
    raise RequestError("prompt must be a string or a list of token ids", "prompt")


def stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise RequestError("stop must be a string or a list of strings", "stop")


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
) -> list[SamplingParams]:
    """One SamplingParams per choice (seed + i for choice i), each checked (RequestError names the field)."""
    choices = []
    for index in range(request.n):
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=None if request.seed is None else request.seed + index,
            stop=stop_strings(request.stop),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
        )
        params.check()
        choices.append(params)
    return choices


def completion_inputs(request: CompletionRequest, tokenizer: Any) -> tuple[list[int], list[SamplingParams]]:
    refuse_unsupported(request)
    ids = prompt_ids(request.prompt, tokenizer)
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    return ids, sampling_params(request, max_tokens, request.logprobs)


def chat_inputs(
    request: ChatCompletionRequest, tokenizer: Any, chat_template: ChatTemplate, max_model_len: int
) -> tuple[list[int], list[SamplingParams]]:
    """Without max_completion_tokens / max_tokens, a reply may run to the end of the context (as OpenAI)."""
    refuse_unsupported(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if request.max_tokens is not None and request.max_completion_tokens not in (None, request.max_tokens):
        raise RequestError("max_tokens and max_completion_tokens differ: send only max_completion_tokens", "max_tokens")
    ids = chat_template.encode(request.messages, tokenizer)
    if request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    elif request.max_tokens is not None:
        max_tokens = request.max_tokens
    else:
        max_tokens = max(1, max_model_len - len(ids))
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return ids, sampling_params(request, max_tokens, logprobs)


def chat_param(request: ChatCompletionRequest, param: str | None) -> str | None:
    """The engine names its inputs (prompt, max_tokens, logprobs); a chat client sent other fields."""
    if param == "prompt":
        return "messages"
    if param == "max_tokens" and request.max_completion_tokens is not None:
        return "max_completion_tokens"
    if param == "logprobs":
        return "top_logprobs"
    return param


# ---------------------------------------------------------------------------------------------
# engine events -> choices


@dataclass
class LogprobEntry:
    token: str
    logprob: float
    top: list[tuple[str, float]]
    text_offset: int


@dataclass
class Delta:
    """What one engine event adds to a choice: new text, its token's logprob, and the end."""

    text: str
    logprob: LogprobEntry | None
    finish_reason: str | None


@dataclass
class Choice:
    """One choice's text so far and its counts; ``add`` takes the engine's events in order."""

    index: int
    tokenizer: Any
    text: str = ""
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, event: Completion) -> Delta:
        entry = None
        if event.logprob is not None and event.token_id is not None:
            entry = self._logprob_entry(event.logprob)
            self.logprobs.append(entry)
        self.text += event.text
        self.finish_reason = event.finish_reason or self.finish_reason
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = event.completion_tokens
        self.cached_tokens = event.cached_tokens
        return Delta(event.text, entry, event.finish_reason)

    def _logprob_entry(self, logprob: TokenLogprob) -> LogprobEntry:
        top = sorted(logprob.top.items(), key=lambda item: -item[1])
        return LogprobEntry(
            token=self._token_text(logprob.token_id),
            logprob=_finite(logprob.logprob),
            top=[(self._token_text(token_id), _finite(value)) for token_id, value in top],
            text_offset=len(self.text),
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


# ---------------------------------------------------------------------------------------------
# response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt_tokens = choices[0].prompt_tokens
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(choice.cached_tokens for choice in choices)},
    }


def completion_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """The legacy completions format: parallel lists per token."""
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [_by_text(entry.top) for entry in entries],
        "text_offset": [entry.text_offset for entry in entries],
    }


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """Token text -> logprob, likeliest first; ids that decode alike (bytes of a partial character all
    show as U+FFFD) keep the likeliest one's logprob."""
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(token, logprob)
    return by_text


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """The chat format: one object per token, with its UTF-8 bytes."""

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(entry.token, entry.logprob), "top_logprobs": [item(token, value) for token, value in entry.top]}
            for entry in entries
        ],
        "refusal": None,
    }


def completion_response(
    response_id: str, model: str, created: int, choices: list[Choice], wants_logprobs: bool
) -> dict:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": completion_logprobs(choice.logprobs) if wants_logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in choices
        ],
        "usage": usage(choices),
    }


def chat_response(response_id: str, model: str, created: int, choices: list[Choice], wants_logprobs: bool) -> dict:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": chat_logprobs(choice.logprobs) if wants_logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in choices
        ],
        "usage": usage(choices),
    }


Kind = Literal["completion", "chat"]
CHUNK_OBJECT = {"completion": "text_completion", "chat": "chat.completion.chunk"}


def chunk(
    kind: Kind, response_id: str, model: str, created: int, index: int, delta: Delta, wants_logprobs: bool
) -> dict:
    """One streamed event of one choice."""
    entries = [delta.logprob] if delta.logprob is not None else []
    if kind == "completion":
        body: dict[str, Any] = {"index": index, "text": delta.text}
        body["logprobs"] = completion_logprobs(entries) if wants_logprobs and entries else None
    else:
        body = {"index": index, "delta": {"content": delta.text} if delta.text or not delta.finish_reason else {}}
        body["logprobs"] = chat_logprobs(entries) if wants_logprobs and entries else None
    body["finish_reason"] = delta.finish_reason
    return _chunk_envelope(kind, response_id, model, created, [body])


def role_chunk(response_id: str, model: str, created: int, index: int) -> dict:
    """The first chat chunk of a choice: the role, no content yet (as OpenAI streams it)."""
    body = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _chunk_envelope("chat", response_id, model, created, [body])


def usage_chunk(kind: Kind, response_id: str, model: str, created: int, choices: list[Choice]) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage of all of them."""
    return {**_chunk_envelope(kind, response_id, model, created, []), "usage": usage(choices)}


def _chunk_envelope(kind: Kind, response_id: str, model: str, created: int, choices: list[dict]) -> dict:
    return {"id": response_id, "object": CHUNK_OBJECT[kind], "created": created, "model": model, "choices": choices}


def model_list(model: str, created: int, max_model_len: int) -> dict:
    entry = {"id": model, "object": "model", "created": created, "owned_by": "hybridlm", "max_model_len": max_model_len}
    return {"object": "list", "data": [entry]}


# ---------------------------------------------------------------------------------------------
# errors


ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's nested error object."""
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's errors, as FastAPI reports them (loc starts with "body")."""
    first = errors[0]
    kind, location = first.get("type", ""), tuple(first.get("loc", ()))
    if location[:1] == ("body",):
        location = location[1:]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON", None
    if not location:
        return "the body must be a JSON object", None
    param = _param(location)
    messages = {
        "missing": f"{param} is required",
        "extra_forbidden": f"{param} is not a field of this endpoint (unknown field)",
    }
    got = repr(first.get("input"))
    got = got if len(got) <= 40 else got[:37] + "..."
    return messages.get(kind, f"{param}: {first.get('msg', 'invalid value')}, got {got}"), param


def _param(location: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
