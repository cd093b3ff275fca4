"""Text <-> token ids on top of the `tokenizers` library, plus chat templates.

A Hugging Face folder carries its whole tokenizer in tokenizer.json. A GGUF file carries only
llama.cpp metadata (tokens, merges or scores, token types, a pre-tokenizer name), from which we
rebuild the equivalent `tokenizers.Tokenizer`, so both sources share one fast encoder/decoder.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from functools import cached_property

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from leanserve.errors import InvalidRequest, ModelLoadError
from leanserve.models.gguf_file import GGUFFile

log = logging.getLogger(__name__)

# Split patterns of llama.cpp's `tokenizer.ggml.pre` names, as written in the models' tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "stablelm2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}  # each digit alone first
_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo"}


def gguf_field(reader: GGUFFile, key: str, default=None):
    """One metadata value of a GGUF file (str, number, bool or list), or `default`."""
    return reader.fields.get(key, default)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` plus chat template and special tokens."""

    def __init__(self, backend: _Backend, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, extra_eos_ids: tuple[int, ...] = ()):
        self._tok = backend
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = {i for i in [eos_id, *extra_eos_ids] if i is not None}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids = special | self.eos_token_ids | ({self.bos_token_id} - {None})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if self.chat_template is None:
            raise InvalidRequest("model has no chat template")
        # Like transformers: tools/documents are always defined, so templates see the same variables.
        variables = {"tools": None, "documents": None, "bos_token": self.bos_token, "eos_token": self.eos_token,
                     **extra, "messages": messages, "add_generation_prompt": add_generation_prompt}
        template = self._template
        try:
            return template.render(**variables)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # the template rejected what the client sent
            raise InvalidRequest(str(e), param="messages") from e

    @cached_property
    def _template(self) -> jinja2.Template:
        try:
            return _TEMPLATE_ENV.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"the model's chat template does not compile: {e}") from e

    @classmethod
    def from_hf_folder(cls, path: str, generation_config: dict | None = None) -> Tokenizer:
        """tokenizer.json is the tokenizer; tokenizer_config.json adds special tokens, BOS/EOS flags and
        the chat template (overridden by chat_template.jinja or chat_template.json, as transformers does)."""
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ModelLoadError(f"{path}: no tokenizer.json")
        try:
            backend = _Backend.from_file(file)
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot be read as a tokenizer: {e}") from e
        config = read_json(os.path.join(path, "tokenizer_config.json"))

        # Tokens tokenizer_config.json names that tokenizer.json does not list as added tokens (transformers
        # adds them too): the added_tokens_decoder entries, and the named special tokens (skipped on decode).
        known = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        for spec in (config.get("added_tokens_decoder") or {}).values():
            if spec["content"] not in known:
                token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                                   lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                   normalized=spec.get("normalized", True), special=spec.get("special", False))
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        named = [_token_content(config.get(f"{kind}_token")) for kind in ("bos", "eos", "unk", "pad")]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t in named if t is not None and t not in known])
        bos, eos = named[:2]
        # transformers rebuilds the post-processor when these flags are given explicitly; so do we.
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos(backend, bos if config.get("add_bos_token") else None,
                         eos if config.get("add_eos_token") else None)

        eos_ids = (generation_config or {}).get("eos_token_id")
        eos_ids = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids or ())
        return cls(backend, bos, eos, _folder_chat_template(path, config), eos_ids)

    @classmethod
    def from_gguf(cls, reader: GGUFFile | str) -> Tokenizer:
        """Rebuild llama.cpp's tokenizer: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE).
        `reader`: the file, read, or its path."""
        if isinstance(reader, str):
            reader = GGUFFile(reader)
        kind = gguf_field(reader, "tokenizer.ggml.model")
        tokens = gguf_field(reader, "tokenizer.ggml.tokens")
        if kind not in ("gpt2", "llama") or not tokens:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
        types = gguf_field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, gguf_field(reader, "tokenizer.ggml.merges", []),
                                      gguf_field(reader, "tokenizer.ggml.pre", "default"))
        else:
            backend = _sentencepiece_bpe(tokens, types, gguf_field(reader, "tokenizer.ggml.scores"),
                                         gguf_field(reader, "tokenizer.ggml.add_space_prefix", True),
                                         gguf_field(reader, "tokenizer.ggml.unknown_token_id"))
        # llama.cpp matches CONTROL and USER_DEFINED tokens whole in the text, before any splitting.
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED])

        def token(key):
            token_id = gguf_field(reader, f"tokenizer.ggml.{key}")
            return None if token_id is None else tokens[token_id]

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = gguf_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's defaults
        add_eos = gguf_field(reader, "tokenizer.ggml.add_eos_token", False)
        _set_bos_eos(backend, bos if add_bos else None, eos if add_eos else None)
        # end-of-turn / end-of-message tokens (e.g. Llama 3's <|eot_id|>) also end generation in llama.cpp
        extra_eos = tuple(i for i in (gguf_field(reader, "tokenizer.ggml.eot_token_id"),
                                      gguf_field(reader, "tokenizer.ggml.eom_token_id")) if i is not None)
        return cls(backend, bos, eos, gguf_field(reader, "tokenizer.chat_template"), extra_eos)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> _Backend:
    """GGUF "gpt2" tokens are already spelled in GPT-2's byte alphabet (e.g. "Ġthe"), like tokenizer.json."""
    backend = _Backend(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2:
            log.warning("GGUF pre-tokenizer %r is not known; splitting text with the GPT-2 regex", pre)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool,
                       unk_id: int | None) -> _Backend:
    """llama.cpp's SPM tokenizer: spaces become "▁" (one prepended to each text piece), then the adjacent
    pair whose concatenation is the highest-scoring token merges first, and characters with no token
    fall back to <0xXX> byte tokens. As BPE, that is: merges ranked by the merged token's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.NORMAL and len(t) > 1]
    mergeable.sort(key=lambda t: -scores[vocab[t]])
    merges = [(t[:i], t[i:]) for t in mergeable for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
    unk = tokens[unk_id] if unk_id is not None else None
    backend = _Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*space, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend


def _set_bos_eos(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """What encode(add_special_tokens=True) adds: BOS before the text and/or EOS after it."""
    pieces = [t for t in (bos, eos) if t is not None]
    single = [bos] * (bos is not None) + ["$A"] + [eos] * (eos is not None)
    pair = single + [bos] * (bos is not None) + ["$B:1"] + [eos] * (eos is not None)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in pieces])


def _folder_chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = read_json(os.path.join(path, "chat_template.json")).get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def read_json(file: str, required: bool = False) -> dict:
    """A JSON file of a model folder; {} when it is absent and optional."""
    if not os.path.isfile(file):
        if required:
            raise ModelLoadError(f"{file} not found")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: {e}") from e


def _token_content(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain json.dumps, without jinja's HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATE_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols])
_TEMPLATE_ENV.filters["tojson"] = _tojson
_TEMPLATE_ENV.globals["raise_exception"] = _raise_exception
_TEMPLATE_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
