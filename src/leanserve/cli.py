"""The `leanserve` command line.

Each subcommand is an entry of COMMANDS: a function that declares its arguments, one that
runs it and returns the exit status, and a one-line help. Every flag has a help string, and
`--help` shows each default.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from .config import DEFAULT_MAX_MODEL_LEN, EngineConfig, LoRAConfig, RouterConfig, ServerConfig
from .energy.config import add_energy_args, energy_config
from .errors import LeanserveError
from .jobs import JobsConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help, except where it says nothing: a default of
    None or an empty list (the help says what happens), on/off switches (--x/--no-x ones
    name the default one), or help that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action, argparse.BooleanOptionalAction) and action.default is not None and "default" not in text:
            return f"{text} (default: {action.option_strings[0 if action.default else 1]})"
        if action.nargs == 0 or action.default in (None, [], ()) or "default" in text:
            return text
        return super()._get_help_string(action)

    def _get_default_metavar_for_optional(self, action):  # --port N, not --port PORT: a shorter usage
        return "N" if action.type in (int, float) else super()._get_default_metavar_for_optional(action)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("leanserve")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _add_engine_args(parser: argparse.ArgumentParser, many_models: bool = False) -> None:
    d = EngineConfig()
    what = ("a Hugging Face folder, a .gguf file, or a built-in model: smollm2-135m (the default, "
            "SmolLM2-135M-Instruct) or gemma3-270m (Gemma 3 270M, base)")
    if many_models:  # serve: several models in one server
        parser.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                            help=what + "; repeat as NAME=PATH to serve several models, each chosen by `model: "
                                        "NAME` (the first one also serves the other APIs)")
    else:
        parser.add_argument("--model", default=None, metavar="PATH", help=what)
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"],
                        help="the dtype of the weights and activations (quantized layers aside)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help=f"context of one sequence, prompt and output (default: the model's, capped at "
                             f"{DEFAULT_MAX_MODEL_LEN}; also capped by the KV cache)")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                        help="tokens (prefill chunks + decodes) in one step")
    parser.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib, help="memory of the paged KV cache")
    parser.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "int8"],
                        help="auto: the model dtype; int8: half the bytes per decode step and twice the tokens "
                             "per GiB, outputs close to but not equal to auto's")
    parser.add_argument("--quantization", choices=["int8", "int4", "auto", "w8a8"], default=None,
                        help="quantization of the linear layers: int8, int4 or auto (int8 for small batches) are "
                             "weight-only; w8a8 also quantizes activations (the fastest from a few sequences up, "
                             "outputs close to but not equal to bf16's)")
    parser.add_argument("--no-w8a8-smoothing", dest="w8a8_smoothing", action="store_false",
                        help="with --quantization w8a8: quantize the weights as they are, without first moving the "
                             "activations' outlier channels into them (SmoothQuant; for comparisons)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="do not share the KV blocks of common prompt prefixes")
    add_energy_args(parser)
    lora = LoRAConfig()
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="serve the PEFT LoRA adapter in folder PATH as model NAME (repeatable)")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="serve every adapter folder in DIR (by folder name); run-time loads may "
                             "only read under these directories (repeatable)")
    parser.add_argument("--max-loras", type=int, default=lora.max_loras,
                        help="LoRA adapters resident at once; the least recently used idle one is evicted")
    parser.add_argument("--max-lora-rank", type=int, default=lora.max_rank, help="largest LoRA rank accepted")
    parser.add_argument("--lora-factor-dtype", default=lora.factor_dtype, choices=["auto", "int8", "bfloat16", "float32"],
                        help="how resident adapters' factors are stored (auto: int8 under a bfloat16 model with the "
                             "native kernel, else float32)")


def _lora_config(args) -> LoRAConfig:
    adapters = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {item!r}")
        adapters[name] = path
    return LoRAConfig(adapters=adapters, dirs=tuple(args.lora_dir), max_loras=args.max_loras,
                      max_rank=args.max_lora_rank, factor_dtype=args.lora_factor_dtype)


def _positive(args, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value >= 0 if zero_ok else value > 0):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _engine_config(args, **extra) -> EngineConfig:
    _positive(args, "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_gib")
    return EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
                        kv_cache_dtype=args.kv_cache_dtype,
                        prefix_caching=args.prefix_caching, quantization=args.quantization,
                        w8a8_smoothing=args.w8a8_smoothing,
                        energy=energy_config(args), lora=_lora_config(args), **extra)


def _load_engine(config: EngineConfig):
    from .engine.engine import AsyncEngine

    return AsyncEngine(config)


# -- serve ------------------------------------------------------------------------------------

def _add_serve(parser: argparse.ArgumentParser) -> None:
    d, e = ServerConfig(), EngineConfig()
    _add_engine_args(parser, many_models=True)
    parser.add_argument("--host", default=d.host, help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=d.port, help="the TCP port to listen on")
    parser.add_argument("--max-waiting", type=int, default=e.max_waiting,
                        help="queued requests beyond this get HTTP 429")
    parser.add_argument("--max-seqs-per-client", type=int, default=e.max_seqs_per_client,
                        help="sequences one client (API key, else address) may have waiting or running; "
                             "past it that client alone gets HTTP 429")
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens, metavar="N",
                        help="output tokens of a chat request that sets no max_tokens (0: up to the context); "
                             "text completions keep OpenAI's 16")
    parser.add_argument("--max-sequences-per-request", type=int, default=d.max_sequences_per_request,
                        help="prompts x n of one request; more get HTTP 400")
    parser.add_argument("--header-timeout-seconds", type=float, default=d.header_timeout_seconds,
                        help="a connection whose request headers take longer is closed")
    parser.add_argument("--body-timeout-seconds", type=float, default=d.body_timeout_seconds,
                        help="a request body that stalls this long between chunks gets HTTP 408")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require this bearer key (repeatable; also $LEANSERVE_API_KEY, comma-separated)")
    parser.add_argument("--api-key-class", action="append", default=None, metavar="KEY=CLASS",
                        help="accept KEY, and run its requests that set no `priority` in CLASS (realtime, "
                             "standard or batch); repeatable; also $LEANSERVE_API_KEY_CLASSES, comma-separated")
    parser.add_argument("--idle-unload-seconds", type=float, default=None, metavar="N",
                        help="scale to zero: free the model weights and KV cache after N idle seconds "
                             "(/ready then answers 503); the next request loads them again")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name clients send (default: the model's)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    parser.add_argument("--usage-log", default=None, metavar="PATH",
                        help="append one JSON line per finished request (read it with `leanserve report`)")
    parser.add_argument("--prompts", default=None, metavar="DIR",
                        help="serve the versioned prompt templates of DIR (*.prompty; docs/prompts.md)")
    _add_router_args(parser)
    jobs = JobsConfig()
    parser.add_argument("--data-dir", default=jobs.data_dir, metavar="DIR",
                        help="where files, batches and async requests are kept (one server per directory)")
    parser.add_argument("--max-batch-concurrency", type=int, default=jobs.max_batch_concurrency,
                        help="Batch API lines in the engine at once")
    parser.add_argument("--max-file-bytes", type=int, default=jobs.max_file_bytes,
                        help="larger uploads to /v1/files get 413")
    parser.add_argument("--vector-store", default=None, metavar="URL",
                        help="where vector stores live: a SQLite file (default DIR/vectors.sqlite3 of --data-dir) "
                             "or postgresql://user@host/db (Postgres with the pgvector extension)")
    parser.add_argument("--embedding-model", default=e.embedding_model, metavar="PATH",
                        help="the sentence-transformers folder of /v1/embeddings and vector stores "
                             "('builtin': all-MiniLM-L6-v2; 'none': no embeddings)")
    parser.add_argument("--carbon-forecast", default=None, metavar="FILE.csv",
                        help="hourly `timestamp,gco2e_per_kwh` forecast: batches start in the cleanest hours "
                             "that still meet their completion window")


def _add_router_args(parser: argparse.ArgumentParser) -> None:
    r = RouterConfig()
    parser.add_argument("--response-cache", choices=("off", "exact", "semantic"), default=r.response_cache,
                        help="answer repeated deterministic chat requests from a cache (semantic: also paraphrased "
                             "last turns, by embedding similarity); requests may narrow it with `cache`")
    parser.add_argument("--cache-ttl-seconds", type=float, default=r.cache_ttl_seconds, metavar="N",
                        help="a cached response is served for N seconds after it was computed")
    parser.add_argument("--cache-max-entries", type=int, default=r.cache_max_entries, metavar="N",
                        help="responses kept in the cache; past it the least recently used goes")
    parser.add_argument("--cache-threshold", type=float, default=None, metavar="SIM",
                        help="cosine similarity of a semantic hit (default 0.9, chosen by `leanserve bench cache`)")
    parser.add_argument("--cascade", action="append", default=[], metavar="NAME=TIER,TIER",
                        help="serve `model: NAME` smallest tier first: a tier is the model, an adapter or an "
                             "--upstream; escalate when the answer's confidence is below --cascade-rule (repeatable)")
    parser.add_argument("--cascade-rule", action="append", default=[], metavar="[NAME=]STAT:THRESHOLD",
                        help="accept a tier's answer when STAT (mean, min or p10 of its token logprobs) >= "
                             "THRESHOLD; default mean:-0.5")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                        help="an OpenAI-compatible server a cascade can escalate to, e.g. "
                             "big=http://host:8001/v1#model=M (key: $LEANSERVE_UPSTREAM_KEY_<NAME>)")
    parser.add_argument("--upstream-timeout-seconds", type=float, default=r.upstream_timeout_seconds, metavar="N",
                        help="an upstream tier that takes longer has failed (the cascade goes on without it)")


def _router_config(args) -> RouterConfig:
    from .router.cascade import Route, Upstream, parse_rule

    _positive(args, "cache_ttl_seconds", "cache_max_entries", "upstream_timeout_seconds")
    if args.cache_threshold is not None and not 0 <= args.cache_threshold <= 1:
        raise ValueError(f"--cache-threshold must be within [0, 1], got {args.cache_threshold}")
    routes = [Route.parse(spec) for spec in args.cascade]
    by_name = {r.name: r for r in routes}
    if len(by_name) != len(routes):
        raise ValueError("--cascade: two routes have the same name")
    for spec in args.cascade_rule:
        name, sep, rule = spec.rpartition("=")
        targets = [by_name[name]] if sep and name in by_name else routes if not sep else None
        if targets is None:
            raise ValueError(f"--cascade-rule {spec!r}: no --cascade named {name!r}")
        for route in targets:
            route.rule = parse_rule(rule)
    upstreams = [Upstream.parse(spec, args.upstream_timeout_seconds) for spec in args.upstream]
    return RouterConfig(response_cache=args.response_cache, cache_max_entries=args.cache_max_entries,
                        cache_ttl_seconds=args.cache_ttl_seconds, cache_threshold=args.cache_threshold,
                        cascades=routes, upstreams=upstreams, upstream_timeout_seconds=args.upstream_timeout_seconds)


def _server_config(args) -> ServerConfig:
    from .serve.auth import api_key_classes, api_keys

    _positive(args, "max_body_bytes", "max_sequences_per_request", "header_timeout_seconds",
              "body_timeout_seconds")
    _positive(args, "default_max_tokens", zero_ok=True)
    return ServerConfig(host=args.host, port=args.port, served_model_name=args.served_model_name,
                        api_keys=api_keys(args.api_key), api_key_classes=api_key_classes(args.api_key_class),
                        max_body_bytes=args.max_body_bytes, usage_log=args.usage_log, prompts_dir=args.prompts,
                        default_max_tokens=args.default_max_tokens or None,
                        max_sequences_per_request=args.max_sequences_per_request,
                        header_timeout_seconds=args.header_timeout_seconds,
                        body_timeout_seconds=args.body_timeout_seconds, router=_router_config(args))


def _serve_engine_config(args) -> EngineConfig:
    if isinstance(args.model, list):  # serve's repeatable --model: the first model's config
        args.model = model_specs(args.model)[0][1]
    _positive(args, "idle_unload_seconds", "max_seqs_per_client")
    return _engine_config(args, max_waiting=args.max_waiting, max_seqs_per_client=args.max_seqs_per_client,
                          idle_unload_seconds=args.idle_unload_seconds,
                          embedding_model=None if args.embedding_model in (None, "none") else args.embedding_model)


def _jobs_config(args) -> JobsConfig:
    return JobsConfig(data_dir=args.data_dir, max_batch_concurrency=args.max_batch_concurrency,
                      max_file_bytes=args.max_file_bytes, carbon_forecast=args.carbon_forecast,
                      vector_store=args.vector_store)


def model_specs(items: list[str]) -> list[tuple[str | None, str]]:
    """`--model` values as (name, path): `NAME=PATH`, or a bare PATH (name: the model's own)."""
    specs = []
    for item in items:
        name, eq, path = item.partition("=")
        if not eq:
            specs.append((None, item))
        elif not name or not path:
            raise ValueError(f"--model takes PATH or NAME=PATH, got {item!r}")
        else:
            specs.append((name, path))
    if len(specs) > 1 and any(name is None for name, _ in specs):
        raise ValueError("with several --model flags, name each one: --model NAME=PATH")
    return specs or [(None, None)]


def load_engines(config: EngineConfig, specs: list[tuple[str | None, str | None]]):
    """The first model's AsyncEngine and {name: engine} of the others. Several models share
    one step thread (engine.SharedStepLoop); the others get no embedding model and no
    --lora adapters (those belong to the first)."""
    from dataclasses import replace

    from .config import LoRAConfig
    from .engine.engine import AsyncEngine, SharedStepLoop

    if len(specs) == 1:
        return AsyncEngine(replace(config, model=specs[0][1])), {}
    loop = SharedStepLoop()
    first = AsyncEngine(replace(config, model=specs[0][1]), shared=loop)
    lora = replace(config.lora, adapters={}, dirs=())
    more = {name: AsyncEngine(replace(config, model=path, embedding_model=None, lora=lora), shared=loop)
            for name, path in specs[1:]}
    return first, more


def _serve(args) -> int:
    from dataclasses import replace

    from .serve.app import run_server

    specs = model_specs(args.model)
    config, jobs = _server_config(args), _jobs_config(args)  # bad flags fail before the model loads
    if specs[0][0] is not None and config.served_model_name is None:
        config = replace(config, served_model_name=specs[0][0])
    first, more = load_engines(_serve_engine_config(args), specs)
    run_server(first, config, jobs, more)
    return 0


# -- generate ---------------------------------------------------------------------------------

def _add_generate(parser: argparse.ArgumentParser) -> None:
    _add_engine_args(parser)
    parser.add_argument("prompt", help="the text to answer")
    parser.add_argument("--max-tokens", type=int, default=256, help="output tokens at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                        help="wrap the prompt in the model's chat template as a user message")


def _generate(args) -> int:
    from .engine.sequence import SamplingParams
    from .serve.app import chat_prompt_ids

    async def run() -> None:
        engine = _load_engine(_engine_config(args))
        await engine.start()
        try:
            prompt = (chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": args.prompt}])
                      if args.chat else args.prompt)
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
            async for out in engine.add_request("generate", prompt, params):
                print(out.text, end="", flush=True)
            print()
        finally:
            await engine.shutdown()

    asyncio.run(run())
    return 0


# -- bench ------------------------------------------------------------------------------------

# kind -> (its module, what it measures)
BENCHES = {
    "offline": ("bench.offline", "leanserve vs transformers in one process"),
    "serve": ("bench.loadgen", "load on any OpenAI-compatible server"),
    "lora": ("bench.lora", "many LoRA adapters vs none, adapter load times"),
    "structured": ("bench.structured", "JSON-schema compile and mask times, constrained vs unconstrained tok/s"),
    "embeddings": ("bench.embeddings", "our encoder vs sentence-transformers, embeddings/s"),
    "vectors": ("bench.vectors", "vector-store search latency and recall@10, SQLite and Postgres"),
    "retrieval": ("bench.retrieval", "/v1/embeddings latency and chat latency during an ingestion, over HTTP"),
    "responses": ("bench.responses", "30 agent calls one by one vs at once, previous_response_id chains' "
                                     "prefix-cache hits, /v1/responses overhead over chat"),
    "kernels": ("kernels.select", "the product kernels measured on this machine and the ones chosen"),
    "cache": ("bench.cache", "semantic cache hit rate and precision per threshold on a paraphrase set"),
    "cascade": ("bench.cascade", "a small-first cascade's accuracy, joules and latency per threshold vs its last tier"),
    "tune": ("bench.tune", "LoRA training tokens/s, leanserve's trainer vs transformers + peft, same batch"),
    "facts": ("bench.facts", "invented-fact recall: base, retrieval, supervised LoRA, memory experts"),
}


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=list(BENCHES),
                        help="; ".join(f"{kind}: {about}" for kind, (_, about) in BENCHES.items()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help of it)")


def _bench(args) -> int:
    import importlib

    module = importlib.import_module(f".{BENCHES[args.kind][0]}", __package__)
    result = module.main(args.rest)
    return result if isinstance(result, int) else 0


# -- batch ------------------------------------------------------------------------------------

def _add_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="submit FILE.jsonl [--wait] [--endpoint E] [--completion-window 24h] [--base-url URL]"
                             " | status BATCH_ID")


def _batch(args) -> int:
    from .batch_cli import main as batch_main

    return batch_main(args.rest)


# -- report -----------------------------------------------------------------------------------

def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="PATH [--by model|adapter|user|prompt] [--plot out.png]")


def _report(args) -> int:
    from .energy import report

    return report.main(args.rest)


# -- prompts ----------------------------------------------------------------------------------

def _add_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="list DIR | show DIR ID [--version V] | render DIR ID [--version V] [--var NAME=VALUE ...]"
                             " [--vars-json JSON]")


def _prompts(args) -> int:
    from .prompts_cli import main as prompts_main

    return prompts_main(args.rest)


# -- tune -------------------------------------------------------------------------------------

def _add_tune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="FILE.jsonl [--method supervised|memory] [--output DIR] | FILE.jsonl --base-url URL "
                             "[--wait] [--suffix S]")


def _tune(args) -> int:
    from .tune_cli import main as tune_main

    return tune_main(args.rest)


# -- ray-serve --------------------------------------------------------------------------------

def _add_ray_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="[--replicas N | --min-replicas 0 --max-replicas N] [serve options]")


def _ray_serve(args) -> int:
    from .ray_cli import main as ray_main

    return ray_main(args.rest)


COMMANDS = {
    "serve": (_add_serve, _serve, "serve a model over an OpenAI-compatible HTTP API"),
    "generate": (_add_generate, _generate, "print one answer to a prompt"),
    "bench": (_add_bench, _bench, "measure throughput and latency against baselines"),
    "batch": (_add_batch, _batch, "submit a JSONL file to a server's Batch API and follow it"),
    "report": (_add_report, _report, "energy, carbon, cost and latency per model, adapter, user and prompt version "
               "of a usage log"),
    "tune": (_add_tune, _tune, "train a LoRA adapter on a chat JSONL file, here or through a server's fine-tuning API"),
    "prompts": (_add_prompts, _prompts, "list, show and render the versioned prompt templates of a directory"),
    "ray-serve": (_add_ray_serve, _ray_serve, "serve on a Ray Serve cluster: replicas with prefix and adapter affinity"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description="LLM serving with a bill on every response",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"leanserve {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these; `leanserve COMMAND --help` shows its flags and their defaults")
    for name, (add_args, run, help) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        return run(args)
    except (LeanserveError, ValueError) as e:  # a bad model or argument: one line, no traceback
        print(f"leanserve {args.command}: {e}", file=sys.stderr)
        return 1
