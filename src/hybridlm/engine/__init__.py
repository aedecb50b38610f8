"""Serving: continuous batching over per-slot hybrid state, prefix caching, an OpenAI-compatible server.

``Engine`` is importable without the ``serve`` extra (fastapi, uvicorn, prometheus_client); the
server (``engine.server``) and the metrics (``engine.metrics``) import them when used.
"""

from hybridlm.engine.engine import Engine, EngineConfig, RequestHandle
from hybridlm.engine.requests import (
    Completion,
    EngineStopped,
    QueueFull,
    RequestError,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStopped",
    "QueueFull",
    "RequestError",
    "RequestHandle",
    "SamplingParams",
    "TokenLogprob",
]
