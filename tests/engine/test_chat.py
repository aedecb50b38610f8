"""ChatTemplate against transformers' own apply_chat_template, the default template against a hand-written
string, and messages refused with the field named."""

import json

import pytest

from hybridlm.checkpoints import load_tokenizer
from hybridlm.engine.chat import ChatTemplate, check_messages
from hybridlm.engine.requests import RequestError
from hybridlm.tokenizer import ByteTokenizer

pytest.importorskip("jinja2")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 2's template: block tags on their own indented lines (trim_blocks / lstrip_blocks matter),
# raise_exception, bos_token and eos_token
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' '  + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""

# namespace, break (loopcontrols) and tojson, which must not escape HTML characters or non-ASCII text
TOJSON = (
    "{%- set ns = namespace(system=none) -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- break -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{ ns.system | tojson }}|{{ messages[-1] | tojson }}{% if add_generation_prompt %}>>{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief <b>&</b>."},
    {"role": "user", "content": "  Héllo there  "},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is 2 + 2?"},
]


def _write_tokenizer(directory, chat_template: str) -> None:
    """A word-level tokenizer.json whose post-processor adds <s> (as Llama's does), and its config."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = [*specials, "system", "user", "assistant", "Hi", "What", "is", "2", "+", "?", ".", "[", "]", "INST"]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    added = {"__type": "AddedToken", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    config = {
        "bos_token": "<s>",
        "eos_token": {**added, "content": "</s>", "special": True},  # how many checkpoints write it
        "unk_token": "<unk>",
        "chat_template": chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.hf
@pytest.mark.parametrize("name, template", [("chatml", CHATML), ("llama2", LLAMA2), ("tojson", TOJSON)])
def test_checkpoint_template_renders_and_tokenizes_as_transformers(tmp_path, name, template):
    transformers = pytest.importorskip("transformers")
    _write_tokenizer(tmp_path, template)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATION if name != "chatml" else CONVERSATION[1:]  # chatml: its own system prompt
    chat = ChatTemplate.from_checkpoint(tmp_path)
    assert chat.source.endswith("tokenizer_config.json (chat_template)")

    expected_text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.render(messages) == expected_text
    expected_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert chat.encode(messages, load_tokenizer(tmp_path)) == expected_ids


@pytest.mark.hf
def test_raise_exception_in_the_template_is_a_request_error_with_its_message(tmp_path):
    transformers = pytest.importorskip("transformers")
    _write_tokenizer(tmp_path, LLAMA2)
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate") as reference_error:
        transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(two_users, tokenize=False)
    with pytest.raises(RequestError, match="must alternate") as error:
        ChatTemplate.from_checkpoint(tmp_path).render(two_users)
    assert error.value.param == "messages"
    assert type(reference_error.value).__name__ == "TemplateError"


def test_default_template_is_the_documented_one():
    chat = ChatTemplate.from_checkpoint("debug-tiny")  # a preset: no directory, the default
    assert chat.source == "default"
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        {"role": "developer", "content": "Answer in French."},
    ]
    expected = "<|system|>\nYou are terse.\n<|user|>\nHello\n<|system|>\nAnswer in French.\n<|assistant|>\n"
    assert chat.render(messages) == expected
    assert chat.encode(messages, ByteTokenizer()) == list(expected.encode())


def test_template_file_wins_over_tokenizer_config_and_named_templates(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "{{ bos_token }}D"},
                ],
            }
        )
    )
    assert ChatTemplate.from_checkpoint(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    chat = ChatTemplate.from_checkpoint(tmp_path)
    assert chat.render([{"role": "user", "content": "x"}]) == "J1"
    assert chat.source.endswith("chat_template.jinja")


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
        ([{"content": "a"}], "messages[0].role"),
        ([{"role": "robot", "content": "a"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
            "messages[0].content[1].type",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
        ([{"role": "assistant", "content": "a", "tool_calls": [{"id": "c1"}]}], "messages[0].tool_calls"),
        ([{"role": "user", "content": "a", "name": 7}], "messages[0].name"),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(RequestError) as error:
        check_messages(messages)
    assert error.value.param == param
    assert param.split(".")[-1].split("[")[0] in str(error.value)


def test_a_template_that_is_not_jinja_is_one_clear_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not valid jinja2"):
        ChatTemplate.from_checkpoint(tmp_path)
