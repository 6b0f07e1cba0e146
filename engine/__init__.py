"""The serving engine: continuous batching of GLM-4V generations over a preallocated KV cache, on one thread.

Layout (nano-vllm's): :mod:`.requests` (what callers submit and receive), :mod:`.sequence` (per-request state and
postprocessing), :mod:`.scheduler` (admission policy, running rows), :mod:`.model_runner` (KV cache, prefill units,
decode step), :mod:`.cuda_graphs` (``--compile``), :mod:`.config` (engine settings, KV-cache sizing) and
:mod:`.llm_engine` (the thread whose step is schedule → run → postprocess). Knows nothing of HTTP.
"""

from .config import EngineConfig, choose_max_model_len, compile_mode
from .llm_engine import Engine, EngineStats
from .requests import EngineStoppedError, Event, GenerationRequest, QueueFullError, RequestHandle

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EngineStoppedError",
    "Event",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
    "choose_max_model_len",
    "compile_mode",
]
