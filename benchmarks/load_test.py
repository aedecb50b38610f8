"""Load test of `hybridlm serve`: N concurrent streaming clients over HTTP, as users would hit it.

    # start a server (python -m hybridlm serve MODEL --port FREE ...), load it, stop it
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.load_test --model debug-small --requests 200 --concurrency 32 \\
        --prompt-len 16-512 --max-tokens 64 --max-slots 32 --baseline-generate --json out/load_test.json
    # a server that already runs
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --requests 40
    # a shared 1K-token system prompt, prefix cache on, then off (--prefix-cache-bytes 0)
    python -m benchmarks.load_test --model debug-small --shared-prefix-tokens 1024 --requests 100

Each client streams ``POST /v1/completions`` (temperature 0, ``stream_options.include_usage``) with
httpx and times every server-sent event: TTFT is the time to the first event, ITL the gaps between
the token events that follow (pooled over all requests, as vLLM's benchmark_serving), e2e the time to
``[DONE]``. Prompts are seeded random printable text of ``--prompt-len`` characters (one token each
with the byte tokenizer of the presets). The run stops issuing requests after ``--requests`` or
``--duration`` seconds, whichever comes first; requests in flight finish. Then ``GET /health`` must
still answer, and is polled until every slot is free again (the pool after the run).

``--baseline-generate`` runs the same requests one at a time through ``hybridlm.generation``'s
``stream_generate`` in this process (same model, seed and threads, after the server has stopped): what
serving them without continuous batching gives. ``--shared-prefix-tokens N`` starts every prompt with
the same N-character system prompt; with ``--model`` the load runs twice, prefix cache on (as the serve
flags say) and off, and reports TTFT both ways and the hit rate from /metrics
(``hybridlm:prefix_cache_hits_total`` / ``hybridlm:prefix_cache_queries_total``, in tokens).
``--warmup`` requests (default 1) go first, one at a time, outside the numbers: the first request
also compiles the native decode kernels and, with a shared prefix, leaves its snapshot behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# passed to `hybridlm serve` as given (None: not passed, the server's default)
SERVE_FLAGS = (
    ("--max-slots", int),
    ("--max-model-len", int),
    ("--memory-budget", str),
    ("--max-waiting", int),
    ("--step-token-budget", int),
    ("--prefix-cache-bytes", str),
    ("--snapshot-interval", int),
    ("--trace", str),
    ("--seed", int),
    ("--dtype", str),
    ("--device", str),
)
PROMPT_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " "
MAX_ERROR_MESSAGES = 5


@dataclass
class RequestSpec:
    index: int
    prompt: str
    max_tokens: int


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    inter_token: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


# -- the workload ----------------------------------------------------------------------------------
def parse_range(text: str, name: str) -> tuple[int, int]:
    """'64' -> (64, 64); '16-512' -> (16, 512); anything else names the flag."""
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise SystemExit(f"load_test: {name} must be N or LOW-HIGH (integers), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise SystemExit(f"load_test: {name} must satisfy 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(PROMPT_CHARACTERS, k=length))


def make_workload(args: argparse.Namespace, count: int) -> list[RequestSpec]:
    """``count`` requests: seeded random prompts, the shared system prompt first if asked."""
    rng = random.Random(args.prompt_seed)
    shared = random_text(rng, args.shared_prefix_tokens) if args.shared_prefix_tokens else ""
    (prompt_low, prompt_high), (tokens_low, tokens_high) = args.prompt_len, args.max_tokens
    specs = []
    for index in range(count):
        prompt = shared + random_text(rng, rng.randint(prompt_low, prompt_high))
        specs.append(RequestSpec(index, prompt, rng.randint(tokens_low, tokens_high)))
    return specs


# -- one streaming client --------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec) -> RequestResult:
    result = RequestResult(spec.index)
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last_event = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    result.e2e = time.perf_counter() - start
                    result.ok = result.error is None
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"in stream: {_error_message(payload.encode())}"
                elif chunk.get("choices"):
                    choice = chunk["choices"][0]
                    is_final_without_token = choice.get("finish_reason") and not choice.get("text")
                    if last_event is None:
                        result.ttft = now - start
                    elif not is_final_without_token:
                        result.inter_token.append(now - last_event)
                    last_event = now
                if chunk.get("usage"):
                    _read_usage(result, chunk["usage"])
            else:
                result.error = result.error or "the stream ended without data: [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


def _read_usage(result: RequestResult, usage: dict) -> None:
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.completion_tokens = usage.get("completion_tokens", 0)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


async def run_load(
    url: str, model: str, specs: list[RequestSpec], concurrency: int, duration: float
) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients take the requests in order until none are left or ``duration`` passed."""
    pending = iter(specs)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30.0, read=600.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def client_loop() -> None:
            while time.perf_counter() < deadline and (spec := next(pending, None)) is not None:
                results.append(await stream_one(client, url, model, spec))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return sorted(results, key=lambda r: r.index), wall


# -- what the run gave -----------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)), "mean": float(array.mean())}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    output_tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": list(dict.fromkeys(errors))[:MAX_ERROR_MESSAGES],
        "wall_seconds": wall,
        "requests_per_second": len(ok) / wall if wall else None,
        "output_tokens": output_tokens,
        "output_tokens_per_second": output_tokens / wall if wall else None,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "ttft_seconds": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_seconds": percentiles([gap for r in ok for gap in r.inter_token]),
        "e2e_seconds": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }


def scrape_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without model_name): value} from /metrics, via prometheus_client's parser."""
    response = httpx.get(f"{url}/metrics", timeout=30.0)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def metrics_delta(before: dict, after: dict) -> dict:
    """What the run added to the server's counters: requests and output tokens (to set beside what the
    clients counted), prefix-cache hit rate and misses, block time per layer type and phase
    (hybridlm:block_seconds), and the expert load imbalance now."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    queries = delta.get(("hybridlm:prefix_cache_queries_total", ()), 0.0)
    hits = delta.get(("hybridlm:prefix_cache_hits_total", ()), 0.0)
    misses = {
        dict(labels)["reason"]: v for (name, labels), v in delta.items() if name == "hybridlm:prefix_cache_misses_total"
    }
    blocks = {}
    for (name, labels), count in delta.items():
        if name == "hybridlm:block_seconds_count" and count > 0:
            seconds = delta[("hybridlm:block_seconds_sum", labels)]
            key = "{layer_type}/{phase}".format(**dict(labels))
            blocks[key] = {"calls": int(count), "mean_us": 1e6 * seconds / count}
    imbalance = {
        dict(labels)["layer"]: v for (name, labels), v in after.items() if name == "hybridlm:expert_load_imbalance"
    }
    finished = sum(v for (name, _), v in delta.items() if name == "hybridlm:request_success_total")
    return {
        "requests_finished": finished,
        "generation_tokens": delta.get(("hybridlm:generation_tokens_total", ()), 0.0),
        "prefix_cache_queried_tokens": queries,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "prefix_cache_misses": misses,
        "block_seconds": dict(sorted(blocks.items())),
        "expert_load_imbalance": imbalance,
    }


def pool_after_run(url: str, settle_seconds: float = 10.0) -> dict:
    """GET /health until no request runs or waits (slots free at the engine's next step), at most
    ``settle_seconds``; the last answer, with whether every slot was free."""
    deadline = time.perf_counter() + settle_seconds
    while True:
        try:
            response = httpx.get(f"{url}/health", timeout=10.0)
            health = {"http_status": response.status_code, **response.json()}
        except (httpx.HTTPError, ValueError) as error:
            return {"answered": False, "error": f"{type(error).__name__}: {error}"}
        settled = health.get("running") == 0 and health.get("waiting") == 0
        if settled or time.perf_counter() > deadline:
            health["answered"] = response.status_code == 200
            health["all_slots_free"] = health.get("free_slots") == health.get("slots")
            return health
        time.sleep(0.1)


def served_model(url: str) -> str:
    response = httpx.get(f"{url}/v1/models", timeout=30.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def load_run(url: str, args: argparse.Namespace, specs: list[RequestSpec], name: str) -> dict:
    model = served_model(url)
    warmup, measured = specs[: args.warmup], specs[args.warmup :]
    for spec in warmup:
        result = asyncio.run(run_load(url, model, [spec], 1, float("inf")))[0][0]
        if not result.ok:
            raise SystemExit(f"load_test: the warm-up request failed: {result.error}")
    before = scrape_metrics(url)
    print(f"[{name}] {len(measured)} requests, concurrency {args.concurrency} ...", file=sys.stderr)
    results, wall = asyncio.run(run_load(url, model, measured, args.concurrency, args.duration))
    return {
        "name": name,
        "summary": summarize(results, wall),
        "metrics": metrics_delta(before, scrape_metrics(url)),
        "pool_after_run": pool_after_run(url),
    }


# -- a server of our own ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m hybridlm serve MODEL --port FREE ...` in a subprocess, ready once /health answers;
    stopped with SIGTERM (drain) on exit. Its output goes to a log file, shown if it fails."""

    def __init__(self, args: argparse.Namespace, overrides: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = {flag: getattr(args, _dest(flag)) for flag, _ in SERVE_FLAGS}
        flags.update(overrides or {})
        threads = ["--threads", str(args.threads)] if args.threads else []
        self.command = [sys.executable, "-m", "hybridlm", *threads, "serve", args.model, "--port", str(self.port)]
        self.command += [part for flag, value in flags.items() if value is not None for part in (flag, str(value))]
        self.startup_timeout = args.startup_timeout
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hybridlm-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        print(f"starting: {' '.join(self.command[1:])}", file=sys.stderr)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.perf_counter() + self.startup_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"load_test: the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise SystemExit(
            f"load_test: no answer from {self.url}/health in {self.startup_timeout:.0f} s:\n{self.output()}"
        )

    def __exit__(self, *exc_info: object) -> None:
        self.exit_code = self.stop()

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)  # drains running requests, then exits 0
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def output(self, last_lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-last_lines:])


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def served_run(args: argparse.Namespace, specs: list[RequestSpec], name: str, **overrides: str) -> dict:
    with ServerProcess(args, overrides) as server:
        run = load_run(server.url, args, specs, name)
    run["server_command"] = " ".join(server.command[1:])
    run["server_exit_code"] = server.exit_code
    return run


# -- the same requests without the server ----------------------------------------------------------
def baseline_generate(args: argparse.Namespace, specs: list[RequestSpec]) -> dict:
    """The requests one at a time through stream_generate, in this process; bounded like the load."""
    import torch

    from hybridlm.checkpoints import load_tokenizer
    from hybridlm.generation import stream_generate
    from hybridlm.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, seed=args.seed or 0, dtype=args.dtype, device=args.device or "cpu", quiet=True)
    tokenizer = load_tokenizer(args.model)
    warmup, measured = specs[: args.warmup], specs[args.warmup :]
    for spec in warmup:
        list(
            stream_generate(
                model, [tokenizer.encode(spec.prompt)], spec.max_tokens, eos_token_id=tokenizer.eos_token_id
            )
        )
    print(f"[baseline generate] {len(measured)} requests, one at a time ...", file=sys.stderr)
    results, finished_at = [], []
    start = time.perf_counter()
    for spec in measured:
        if time.perf_counter() - start > args.duration:
            break
        results.append(_generate_one(model, tokenizer, spec, stream_generate))
        finished_at.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    summary = summarize(results, wall)
    # every request arrived at the start and waited for the ones before it: what its client saw
    summary["e2e_seconds_with_waiting"] = percentiles(finished_at)
    return {"name": "generate, one request at a time", "summary": summary, "threads": torch.get_num_threads()}


def _generate_one(model, tokenizer, spec: RequestSpec, stream_generate) -> RequestResult:
    ids = tokenizer.encode(spec.prompt)
    result = RequestResult(spec.index, prompt_tokens=len(ids))
    start = last = time.perf_counter()
    for token in stream_generate(model, [ids], spec.max_tokens, eos_token_id=tokenizer.eos_token_id):
        now = time.perf_counter()
        if result.ttft is None:
            result.ttft = now - start
        else:
            result.inter_token.append(now - last)
        last = now
        result.completion_tokens += 1
        if tokenizer.eos_token_id is not None and int(token[0]) == tokenizer.eos_token_id:
            break
    result.e2e, result.ok = time.perf_counter() - start, True
    return result


# -- the report ------------------------------------------------------------------------------------
def _ms(stats: dict) -> str:
    return "-" if stats["p50"] is None else f"{1e3 * stats['p50']:,.1f} / {1e3 * stats['p99']:,.1f}"


def print_report(report: dict) -> None:
    runs = [*report["runs"], *([report["baseline"]] if report.get("baseline") else [])]
    print("| run | done / errors | req/s | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        s = run["summary"]
        print(
            f"| {run['name']} | {s['completed']} / {s['errors']} | {s['requests_per_second']:.2f} | "
            f"{s['output_tokens_per_second']:.1f} | {_ms(s['ttft_seconds'])} | {_ms(s['itl_seconds'])} | "
            f"{_ms(s['e2e_seconds'])} |"
        )
    for run in runs:
        s = run["summary"]
        for message in s["first_errors"]:
            print(f"error ({run['name']}): {message}")
        if "e2e_seconds_with_waiting" in s:
            print(
                f"{run['name']}: e2e p50 / p99 ms counting the wait behind earlier requests: "
                f"{_ms(s['e2e_seconds_with_waiting'])}"
            )
        if "pool_after_run" in run:
            pool = run["pool_after_run"]
            print(
                f"{run['name']}: /health after the run: answered={pool.get('answered')} "
                f"running={pool.get('running')} waiting={pool.get('waiting')} free_slots={pool.get('free_slots')} "
                f"of {pool.get('slots')} (all free: {pool.get('all_slots_free')})"
            )
        metrics = run.get("metrics", {})
        if metrics:
            print(
                f"{run['name']}: /metrics counted {metrics['requests_finished']:.0f} requests and "
                f"{metrics['generation_tokens']:.0f} output tokens; the clients {s['completed']} and "
                f"{s['output_tokens']}"
            )
        if metrics.get("prefix_cache_hit_rate") is not None:
            print(
                f"{run['name']}: prefix cache hit rate {100 * metrics['prefix_cache_hit_rate']:.1f}% of "
                f"{metrics['prefix_cache_queried_tokens']:,.0f} prompt tokens; misses by reason "
                f"{metrics['prefix_cache_misses']}"
            )
        if metrics.get("block_seconds"):
            means = ", ".join(f"{k} {v['mean_us']:,.0f}" for k, v in metrics["block_seconds"].items())
            print(f"{run['name']}: mean block µs (hybridlm:block_seconds): {means}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start `hybridlm serve MODEL` on a free loopback port")
    parser.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    parser.add_argument("--duration", type=float, default=600.0, help="stop issuing after this many seconds")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent streaming clients (default 32)")
    parser.add_argument("--prompt-len", default="16-512", help="prompt characters, N or LOW-HIGH (default 16-512)")
    parser.add_argument("--max-tokens", default="64", help="max_tokens per request, N or LOW-HIGH (default 64)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompts and lengths")
    parser.add_argument("--shared-prefix-tokens", type=int, default=0, help="a system prompt every prompt starts with")
    parser.add_argument("--warmup", type=int, default=1, help="requests sent first, one at a time, not counted")
    parser.add_argument("--baseline-generate", action="store_true", help="also run the requests one at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server and the baseline")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    serve = parser.add_argument_group("passed to `hybridlm serve` (with --model)")
    for flag, kind in SERVE_FLAGS:
        serve.add_argument(flag, type=kind, default=None)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            raise SystemExit(f"load_test: --{name} must be >= 1, got {getattr(args, name)}")
    if args.duration <= 0 or args.warmup < 0 or args.shared_prefix_tokens < 0:
        raise SystemExit("load_test: --duration must be > 0, --warmup and --shared-prefix-tokens >= 0")
    if args.baseline_generate and not args.model:
        raise SystemExit("load_test: --baseline-generate needs --model (it loads the model in this process)")
    if args.url and any(getattr(args, _dest(flag)) is not None for flag, _ in SERVE_FLAGS):
        raise SystemExit("load_test: serve flags go with --model; a server given by --url runs with its own")
    args.prompt_len = parse_range(args.prompt_len, "--prompt-len")
    args.max_tokens = parse_range(args.max_tokens, "--max-tokens")
    args.url = args.url.rstrip("/") if args.url else None


def main() -> None:
    args = build_parser().parse_args()
    check_args(args)
    specs = make_workload(args, args.warmup + args.requests)
    report: dict = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "runs": []}
    if args.url:
        report["runs"].append(load_run(args.url, args, specs, "server"))
    elif args.shared_prefix_tokens:
        report["runs"].append(served_run(args, specs, "server, prefix cache on"))
        report["runs"].append(served_run(args, specs, "server, prefix cache off", **{"--prefix-cache-bytes": "0"}))
    else:
        report["runs"].append(served_run(args, specs, "server"))
    if args.baseline_generate:
        report["baseline"] = baseline_generate(args, specs)
    print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
