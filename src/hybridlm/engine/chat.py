"""Chat messages to prompt text: the checkpoint's own chat template, or a simple documented default.

Which template ``ChatTemplate.from_checkpoint(dir)`` uses, first match wins:

1. ``chat_template.jinja`` in the checkpoint directory (what transformers writes since 4.50);
2. ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}``
   entries, of which the one named ``default`` is used);
3. the default template below, for presets and checkpoints that ship none.

A checkpoint's template is rendered as transformers' ``apply_chat_template`` renders it: jinja2's
``ImmutableSandboxedEnvironment`` (a template from the Hub is untrusted code) with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML,
``raise_exception(message)``, ``strftime_now(format)``, and the variables ``messages``,
``add_generation_prompt=True``, ``tools=None``, ``documents=None`` and the special tokens that
tokenizer_config.json names (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` and the rest). The rendered
text is tokenized without adding special tokens (the template writes them), as transformers does.

The default template writes each message as ``<|role|>`` on its own line, then the content and a
newline, and ends with ``<|assistant|>`` and a newline for the reply::

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

Messages are ``{"role", "content"}`` dicts (``name`` allowed). Roles are system, developer (passed as
system, as OpenAI documents), user and assistant. Content is a string or a list of
``{"type": "text", "text": ...}`` parts, joined into one string (images and audio are refused). A bad
message raises ``RequestError`` whose ``param`` names it (``messages[1].role``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hybridlm.engine.requests import RequestError

ROLES = ("system", "developer", "user", "assistant")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    """Renders OpenAI chat messages to the prompt text a model was trained on.

    ``template`` is jinja2 source (None: the default template); ``special_tokens`` maps bos_token etc.
    to their text; ``source`` says where the template came from (shown at start-up).
    """

    def __init__(
        self,
        template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        source: str = "default",
    ) -> None:
        self.source = source if template is not None else "default"
        self.template_text = template if template is not None else DEFAULT_TEMPLATE
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(self.template_text)

    @classmethod
    def from_checkpoint(cls, name_or_path: str | Path) -> ChatTemplate:
        """The directory's own template, else the default (also for a preset name)."""
        directory = Path(name_or_path)
        if not directory.is_dir():
            return cls()
        config = _read_json(directory / "tokenizer_config.json")
        special_tokens = _special_tokens(config)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special_tokens, str(jinja_file))
        template = _template_from_config(config.get("chat_template"))
        if template is not None:
            return cls(template, special_tokens, f"{directory / 'tokenizer_config.json'} (chat_template)")
        return cls(special_tokens=special_tokens)

    def render(self, messages: Sequence[Any]) -> str:
        """The prompt text for ``messages``, ending where the assistant's reply starts."""
        import jinja2

        plain = check_messages(messages)
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=True,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as error:  # raise_exception() in the template, or a template bug
            raise RequestError(f"the chat template refused the messages: {error}", "messages") from None
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise RequestError(f"the chat template failed on the messages: {error}", "messages") from None

    def encode(self, messages: Sequence[Any], tokenizer: Any) -> list[int]:
        """Token ids of the rendered prompt, with no special tokens added beyond the template's own."""
        text = self.render(messages)
        inner = getattr(tokenizer, "tokenizer", None)  # hybridlm's HFTokenizer wraps a tokenizers.Tokenizer
        if inner is not None and hasattr(inner, "encode"):
            return list(inner.encode(text, add_special_tokens=False).ids)
        return list(tokenizer.encode(text))


def check_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"[, "name"]}`` dicts, or a RequestError naming the bad field."""
    if not isinstance(messages, list | tuple) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    return [_check_message(message, f"messages[{index}]") for index, message in enumerate(messages)]


def _check_message(message: Any, where: str) -> dict[str, str]:
    if not isinstance(message, Mapping):
        raise RequestError(f"{where} must be an object with role and content", where)
    # clients that send back an assistant message as they got it include "refusal": null, "tool_calls": []
    unknown = sorted(key for key in set(message) - {"role", "content", "name"} if message[key] not in (None, []))
    if unknown:
        raise RequestError(
            f"{where}.{unknown[0]} is not supported (messages take role, content, name)", f"{where}.{unknown[0]}"
        )
    role = message.get("role")
    if role is None:
        raise RequestError(f"{where}.role is missing", f"{where}.role")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
    if "content" not in message or message["content"] is None:
        raise RequestError(f"{where}.content is missing", f"{where}.content")
    plain = {"role": "system" if role == "developer" else role, "content": _content_text(message["content"], where)}
    if message.get("name") is not None:
        if not isinstance(message["name"], str):
            raise RequestError(f"{where}.name must be a string", f"{where}.name")
        plain["name"] = message["name"]
    return plain


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        part_where = f"{where}.content[{index}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise RequestError(
                f"{part_where}.type must be 'text' (got {kind!r}): only text is supported", f"{part_where}.type"
            )
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{part_where}.text must be a string", f"{part_where}.text")
        texts.append(part["text"])
    return "".join(texts)


def _compile(source: str) -> Any:
    """A template compiled in the environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson escapes <, > and & for HTML, which would change the prompt text
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template is not valid jinja2 (line {error.lineno}: {error.message})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """bos_token etc. as text: tokenizer_config.json writes them as strings or AddedToken dicts."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    return None
