"""What `leanserve serve` says when it starts: the model and the engine around it, the
limits that bound a request's work, and a request to paste. `model_facts` is also the
`leanserve` field of the base model's /v1/models entry."""
from __future__ import annotations

import json
import os
import shlex
import sys

import torch

from ..kernels import names, native
from ..models.loader import model_path, weights_format
from ..models.quant import PackedLinear


def model_facts(engine) -> dict:
    """Facts about the model an `AsyncEngine` serves, as JSON-able values."""
    core = engine.engine
    path = model_path(core.config.model)
    return {
        "architecture": core.args.arch,
        "parameters": parameter_count(core.args),
        "weights_file": os.path.basename(os.path.normpath(path)),
        "weights_format": weights_format(path),
        "dtype": _dtype_name(core.dtype),
        "quantization": core.config.quantization,
        "kv_cache_dtype": _dtype_name(core.kv_dtype),
        "max_model_len": engine.max_model_len,
        "kv_cache_tokens": core.kv.num_blocks * core.config.block_size,
        "kv_block_size": core.config.block_size,
        "native_kernels": kernel_facts(core.lora),
        "lora_adapters": sorted(core.lora.adapters),
        "energy_meter": core.ledger.source,
    }


def parameter_count(args) -> int:
    """From the shapes, so it holds for quantized, packed or unloaded weights alike."""
    h, q, kv = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attention = h * (2 * q + 2 * kv) + (q + 2 * kv) * args.qkv_bias
    mlp = 3 * h * args.intermediate_size
    if args.num_experts:
        mlp = args.num_experts * mlp + h * args.num_experts  # the experts and their router
    embeddings = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return embeddings + h + args.num_layers * (attention + mlp + 2 * h)


def kernel_facts(lora) -> dict[str, str]:
    """'native' or 'torch' (the fallback, where the build failed) per kernels/*.cpp. The LoRA
    kernel is loaded with the adapter slots, at the first request naming an adapter; it is
    not built here (that can take a minute)."""
    out = {}
    for name in names():
        if name == "lora":
            out[name] = ("native" if lora.kernel is not None else "torch") if lora.stacks else "at first adapter use"
        else:
            out[name] = "native" if native(name) is not None else "torch"
    return out


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text(server, data_dir: str | None) -> str:
    """The startup text for an `OpenAIServer`, from `model_facts` and its config."""
    f, config = model_facts(server.engine), server.config
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{config.port}"
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "Hello!"}]}
    auth = ' -H "Authorization: Bearer $LEANSERVE_API_KEY"' if config.api_keys else ""
    tokens, block = f["kv_cache_tokens"], f["kv_block_size"]
    rows = {
        "model": f"{f['architecture']}, {f['parameters'] / 1e6:.1f}M parameters",
        "weights": f"{f['weights_file']} ({f['weights_format']}), converted to {f['dtype']} on load"
                   + (f", then {f['quantization']} quantized" if f["quantization"] else ""),
        "context": f"{f['max_model_len']} tokens",
        "kv cache": f"{tokens} tokens ({tokens // block} blocks x {block}), {f['kv_cache_dtype']}",
        "kernels": ", ".join(f"{k} {v}" for k, v in f["native_kernels"].items()),
        "lora": ", ".join(f["lora_adapters"]) or "no adapters registered",
        "energy": f"{f['energy_meter']} meter" + (" (an estimate, not a measurement)"
                                                  if "estimate" in f["energy_meter"] else ""),
        "data dir": os.path.abspath(data_dir) if data_dir else "none (no Batch API)",
        "limits": f"chat max_tokens {config.default_max_tokens or 'up to the context'} when unset, "
                  f"{config.max_sequences_per_request} sequences (prompts x n) per request",
        **({"note": "this CPU has no bf16 dot products (no AVX512-BF16 or AMX): bf16 is emulated and slower "
                    "than float32 here; --dtype float32 is faster"}
           if f["dtype"] == "bfloat16" and not PackedLinear.available(torch.bfloat16) else {}),
        "url": f"{url}/v1",
        "try": f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
               f"-d {shlex.quote(json.dumps(body))}",
    }
    return "\n".join([f"leanserve serving {server.model_name}", *(f"  {k:<9} {v}" for k, v in rows.items())])


def show(server, data_dir: str | None) -> None:
    print(text(server, data_dir), file=sys.stderr, flush=True)
