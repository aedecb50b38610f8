"""The real ``hybridlm serve`` in a subprocess on a free loopback port, spoken to over HTTP by the real
``openai`` client (and httpx for raw bytes, bad input and disconnects).

The truths the answers are held to come from outside the server: ``hybridlm generate`` for greedy
text, the byte tokenizer for token counts, the documented default chat template, prometheus_client's
own parser for /metrics, and the process's exit status for SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "debug-small"
MAX_MODEL_LEN = 512
START_TIMEOUT = 180  # seconds to import torch and build debug-small on a busy 2-core machine
SETTLE_TIMEOUT = 60  # seconds for an aborted request's slot to come back (it takes one engine step)
PROMPT = "Hybrid models keep state: "
# one thread in the server and in `generate`, so both reduce in the same order
THREADS = ("--threads", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m hybridlm serve`` on a free port, its stderr in a file."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "hybridlm", *THREADS, "serve", *args, "--port", str(self.port)]
        env = {**os.environ, "HYBRIDLM_PROGRESS": "0", "OMP_WAIT_POLICY": "PASSIVE"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not answer /health within {START_TIMEOUT}s:\n{self.log.read_text()}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_until_idle(self) -> dict:
        """Poll /health until nothing runs or waits and every slot is free (bounded)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            stats = self.health()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_slots"] == stats["slots"]:
                return stats
            assert time.monotonic() < deadline, f"slots still busy after {SETTLE_TIMEOUT}s: {stats}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    running = Server(logs, MODEL, "--max-slots", "4", "--max-model-len", str(MAX_MODEL_LEN), "--drain-timeout", "5")
    yield running
    running.stop()


def _post(server: Server, path: str, body: dict | str | bytes) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{server.url}{path}", json=body, timeout=120)
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=120)


def _sse_events(response: httpx.Response) -> list[str]:
    """The data fields of a server-sent-event stream, in order."""
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def _metrics(server: Server) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _sample(samples: dict, name: str, **labels: str) -> float:
    wanted = {("model_name", MODEL), *labels.items()}
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(sample_labels) == wanted
    )


# ---------------------------------------------------------------------------------------------
# completions


def test_plain_and_streamed_completions_agree(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.object == "text_completion" and len(plain.choices) == 1
    assert plain.choices[0].finish_reason == "length"
    prompt_tokens = len(PROMPT.encode())  # debug-small's tokenizer is UTF-8 bytes
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == prompt_tokens + 12
    assert 0 <= plain.usage.prompt_tokens_details.cached_tokens < prompt_tokens

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [chunk for chunk in chunks if chunk.choices]
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    *chunks, usage = [json.loads(event) for event in events[:-1]]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # without include_usage: no usage chunk
    body.pop("stream_options")
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        events = _sse_events(response)
    assert events[-1] == "[DONE]" and all(json.loads(event)["choices"] for event in events[:-1])


def test_greedy_output_equals_hybridlm_generate(server):
    new_tokens = 24
    served = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=new_tokens, temperature=0)
    # same preset, same --seed default (0) for the weights, same threads
    command = [sys.executable, "-m", "hybridlm", *THREADS, "generate", MODEL, "--prompt", PROMPT]
    command += ["--max-new-tokens", str(new_tokens), "--temperature", "0"]
    # bytes, not text: a random model's output may hold a \r that text mode would turn into \n
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, capture_output=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    generated = result.stdout.decode("utf-8")
    assert generated.startswith(PROMPT) and generated.endswith("\n")
    assert served.choices[0].text == generated[len(PROMPT) : -1]


def test_prompt_as_token_ids_equals_the_text_prompt(server):
    client = server.client()
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=list(PROMPT.encode()), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens
    batch_of_one = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=8, temperature=0)
    assert batch_of_one.choices[0].text == by_text.choices[0].text


def test_stop_strings_n_seed_and_logprobs(server):
    client = server.client()
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    printable = [char for char in greedy[2:] if char.isascii() and char.isprintable()]
    if printable:  # a random model's text: stop at the first printable character after the second
        stop = printable[0]
        stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop)
        assert stopped.choices[0].text == greedy[: greedy.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"

    sampled = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=3, seed=7, top_p=0.95, extra_body={"top_k": 40}
    )
    assert sorted(choice.index for choice in sampled.choices) == [0, 1, 2]
    assert sampled.usage.completion_tokens == 18 and sampled.usage.prompt_tokens == len(PROMPT.encode())
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, seed=7, top_p=0.95, extra_body={"top_k": 40}
    )
    assert again.choices[0].text == sampled.choices[0].text  # choice 0 of n uses the seed itself

    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy takes the likeliest token
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_several_choices_stream_interleaved_with_their_index(server):
    greedy = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "n": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    texts, finished = {0: "", 1: ""}, {}
    for event in events[:-1]:
        (choice,) = json.loads(event)["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == {0: greedy.choices[0].text, 1: greedy.choices[0].text}  # greedy: both choices alike
    assert finished == {0: "length", 1: "length"}


def test_null_fields_take_their_defaults(server):
    nulls = dict.fromkeys(("n", "stream", "stream_options", "stop", "logprobs", "echo", "temperature", "seed", "user"))
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x", "refusal": None}], "max_tokens": 2}
    response = _post(server, "/v1/chat/completions", {**chat, "logprobs": None, "tools": None, "n": None})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------------
# chat


def test_chat_renders_the_default_template(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    rendered = "<|system|>\nBe brief.\n<|user|>\nHello!\n<|assistant|>\n"  # the default, as chat.py documents it
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    completion = client.completions.create(model=MODEL, prompt=rendered, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(rendered.encode())
    assert chat.usage.completion_tokens == 10

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    entries = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert len(entries) == 10
    assert all(len(entry.top_logprobs) <= 2 and entry.logprob <= 0 for entry in entries)


@pytest.fixture(scope="module")
def template_server(tmp_path_factory):
    """debug-tiny saved as a checkpoint whose tokenizer_config.json ships a chat template; one slot and
    a waiting queue of one, for the 429 test."""
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.loading import load_model

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system messages') }}{% endif %}"
        "[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT] {% endif %}",
    }
    save_pretrained(
        load_model("debug-tiny", quiet=True),
        directory,
        extra_files={"tokenizer_config.json": json.dumps(config).encode()},
    )
    running = Server(directory.parent, str(directory), "--max-slots", "1", "--max-waiting", "1")
    yield running
    running.stop()


def test_chat_uses_the_checkpoints_template(template_server):
    client = template_server.client()
    assert [model.id for model in client.models.list().data] == ["tiny-chat"]  # the directory's name
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Go"},
    ]
    rendered = "<s>[USER] Hi</s>[ASSISTANT] Yo</s>[USER] Go</s>[ASSISTANT] "
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    completion = client.completions.create(model="tiny-chat", prompt=rendered, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(rendered.encode())

    refused = _post(
        template_server,
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "system", "content": "x"}]},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages" and "no system messages" in refused.json()["error"]["message"]


def test_a_full_queue_answers_429(template_server):
    body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 2000, "stream": True}
    with (
        httpx.stream("POST", f"{template_server.url}/v1/completions", json=body, timeout=120) as running,
        httpx.stream("POST", f"{template_server.url}/v1/completions", json=body, timeout=120) as waiting,
    ):
        assert running.status_code == waiting.status_code == 200
        refused = _post(template_server, "/v1/completions", {**body, "stream": False})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
    template_server.wait_until_idle()  # both streams closed: aborted, their slot and place free


# ---------------------------------------------------------------------------------------------
# bad input


BAD_COMPLETIONS = [
    # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "colour": "red"}, 400, "colour"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, -2]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 100000]}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x" * MAX_MODEL_LEN}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "stop": 3}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "seed": True}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"extra": 1}}, 400, "stream_options.extra"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
]

BAD_CHATS = [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
        400,
        "messages[1].role",
    ),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}], "max_tokens": 1},
        400,
        "messages",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": MAX_MODEL_LEN},
        400,
        "max_completion_tokens",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99},
        400,
        "top_logprobs",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


def _check_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("body, status, param", BAD_COMPLETIONS, ids=[str(case[2]) for case in BAD_COMPLETIONS])
def test_bad_completion_requests_name_the_field(server, body, status, param):
    _check_error(_post(server, "/v1/completions", body), status, param)


@pytest.mark.parametrize("body, status, param", BAD_CHATS, ids=[str(case[2]) for case in BAD_CHATS])
def test_bad_chat_requests_name_the_field(server, body, status, param):
    _check_error(_post(server, "/v1/chat/completions", body), status, param)


def test_the_server_keeps_serving_after_bad_input(server):
    for body, _, _ in BAD_COMPLETIONS[:8]:
        _post(server, "/v1/completions", body)
    stats = server.wait_until_idle()
    assert stats["status"] == "ok"
    fine = server.client().completions.create(
        model=MODEL, prompt="x", max_tokens=2, user="u1", extra_body={"metadata": {"k": "v"}}
    )
    assert fine.usage.completion_tokens == 2  # fields that change no output are accepted
    assert _post(server, "/v1/nowhere", {}).json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405


def test_openai_client_sees_errors_as_its_own_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


# ---------------------------------------------------------------------------------------------
# disconnects, /health, /v1/models, /metrics


def test_a_client_that_disconnects_mid_stream_has_its_request_aborted(server):
    server.wait_until_idle()
    aborted = _sample(_metrics(server), "hybridlm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 64, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"][0]["finish_reason"] is None
    server.wait_until_idle()
    after = _metrics(server)
    assert _sample(after, "hybridlm:request_success_total", finished_reason="abort") == aborted + 1


def test_a_client_that_disconnects_while_waiting_for_a_plain_answer_has_it_aborted(server):
    server.wait_until_idle()
    aborted = _sample(_metrics(server), "hybridlm:request_success_total", finished_reason="abort")
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 64}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request + body)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while server.health()["running"] == 0:  # wait until it runs, then hang up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    server.wait_until_idle()
    assert _sample(_metrics(server), "hybridlm:request_success_total", finished_reason="abort") == aborted + 1


def test_health_and_models(server):
    stats = server.health()
    assert stats["status"] == "ok" and stats["slots"] == 4
    models = server.client().models.list().data
    assert [model.id for model in models] == [MODEL]


def test_metrics_parse_and_count_a_request(server):
    server.wait_until_idle()
    before = _metrics(server)
    done = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0)
    server.wait_until_idle()
    after = _metrics(server)
    assert (
        _sample(after, "hybridlm:prompt_tokens_total") - _sample(before, "hybridlm:prompt_tokens_total")
        == done.usage.prompt_tokens
    )
    assert _sample(after, "hybridlm:generation_tokens_total") - _sample(before, "hybridlm:generation_tokens_total") == 7
    assert (
        _sample(after, "hybridlm:time_to_first_token_seconds_count")
        == _sample(before, "hybridlm:time_to_first_token_seconds_count") + 1
    )
    names = {name for name, _ in after}
    for name in (
        "hybridlm:e2e_request_latency_seconds_count",
        "hybridlm:inter_token_latency_seconds_count",
        "hybridlm:request_queue_time_seconds_count",
        "hybridlm:num_requests_running",
        "hybridlm:num_requests_waiting",
        "hybridlm:prefix_cache_queries_total",
        "hybridlm:prefix_cache_hits_total",
    ):
        assert name in names, name


# ---------------------------------------------------------------------------------------------
# start-up and shutdown


def test_a_port_in_use_is_one_line(server):
    result = run_cli("serve", "debug-tiny", "--port", str(server.port))
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sigterm_drains_then_exits_zero_and_the_trace_reports(tmp_path):
    trace = tmp_path / "serve.duckdb"
    running = Server(tmp_path, "debug-tiny", "--max-slots", "2", "--drain-timeout", "2", "--trace", str(trace))
    body = {"model": "debug-tiny", "prompt": "x", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        running.process.send_signal(signal.SIGTERM)
        # while the stream drains, the server refuses new work with 503
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (health := httpx.get(f"{running.url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "SIGTERM did not stop the server taking requests"
            time.sleep(0.02)
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        refused = _post(running, "/v1/completions", {**body, "stream": False})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] in ("length", "abort")  # aborted after 2s unless done
    assert running.process.wait(timeout=60) == 0
    log = running.log.read_text()
    assert "SIGTERM" in log and "Traceback" not in log

    report = run_cli("report", str(trace))
    assert report.returncode == 0, report.stderr
    assert "phase prefill" in report.stdout and "phase decode" in report.stdout


def test_a_second_interrupt_aborts_at_once_and_streams_still_end_cleanly(tmp_path):
    running = Server(tmp_path, "debug-tiny", "--drain-timeout", "600")
    body = {"model": "debug-tiny", "prompt": "x", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        running.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while httpx.get(f"{running.url}/health", timeout=10).status_code == 200:  # the first one is handled
            assert time.monotonic() < deadline, "SIGINT did not stop the server taking requests"
            time.sleep(0.02)
        running.process.send_signal(signal.SIGINT)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] in ("length", "abort")
    assert running.process.wait(timeout=60) == 0
    assert "Traceback" not in running.log.read_text()
