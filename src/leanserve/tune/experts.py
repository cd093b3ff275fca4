"""Memory experts: facts grouped by embedding clusters, one LoRA adapter per group, and a
selector that picks the expert for each request.

Grouping: each fact (a training line) is embedded as the mean of its phrasings' vectors
(all-MiniLM-L6-v2, the built-in embedding model of rag/embed.py), so a fact's paraphrases
are in one group by construction; facts are clustered by spherical k-means (farthest-point
start, deterministic). `experts: "auto"` gives one group per EXPERT_FACTS facts.

Selection: an index over every phrasing's question vector. A request's last user message
is embedded; the nearest phrasing's group answers, unless the cosine similarity is below
`floor`, in which case no adapter is applied (the base model answers: unrelated questions
get the base's answers exactly).

On disk (one folder): `expert-<k>/` (PEFT folders) and `selector.json` (floor, the expert
folder names, the questions and their groups) + `selector.safetensors` (the vectors).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .data import Dataset, Example
from .memory import augment, memory_hyperparameters, phrasings

EXPERT_FACTS = 8  # facts per expert with experts: "auto"
DEFAULT_FLOOR = 0.6  # cosine similarity below which no expert is applied


def last_user(messages: list[dict]) -> str:
    users = [m.get("content") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else ""


class Embedder:
    """The built-in sentence embedding model, loaded once (normalised float32 vectors)."""

    _model = None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if Embedder._model is None:
            from ..rag.embed import EmbeddingModel

            Embedder._model = EmbeddingModel.builtin(torch.float32)
        m = Embedder._model
        v = m.embed([m.truncate(ids) for ids in m.tokenize(texts)])
        return torch.nn.functional.normalize(v, dim=-1)


def n_experts(experts, n_facts: int) -> int:
    k = math.ceil(n_facts / EXPERT_FACTS) if experts in ("auto", None) else int(experts)
    return max(1, min(k, n_facts))


def kmeans(x: torch.Tensor, k: int, iters: int = 25) -> list[int]:
    """Spherical k-means over normalised rows; farthest-point initialisation from row 0."""
    centers = [0]
    for _ in range(1, k):
        sim = (x @ x[centers].T).max(-1).values
        sim[centers] = 2.0
        centers.append(int(sim.argmin()))
    c = x[centers].clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = (x @ c.T).argmax(-1)
        if _ and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                c[j] = torch.nn.functional.normalize(x[assign == j].mean(0), dim=0)
    return assign.tolist()


def group_facts(examples: list[Example], experts, embed) -> list[int]:
    """The group of each example (fact), from its phrasings' mean vector."""
    questions = [phrasings(last_user(ex.messages)) for ex in examples]
    flat = embed([q for qs in questions for q in qs])
    vecs, at = [], 0
    for qs in questions:
        vecs.append(flat[at:at + len(qs)].mean(0))
        at += len(qs)
    x = torch.nn.functional.normalize(torch.stack(vecs), dim=-1)
    return kmeans(x, n_experts(experts, len(examples)))


@dataclass
class Selector:
    vectors: torch.Tensor  # [N, dim] normalised question vectors
    groups: list[int]  # the expert index of each
    experts: list[str]  # the adapter (folder) name of each expert
    floor: float = DEFAULT_FLOOR
    questions: list[str] | None = None

    def select(self, questions: list[str], embed) -> list[str | None]:
        """The expert of each question, None where the nearest fact is below the floor."""
        sim = embed(questions) @ self.vectors.T
        best = sim.max(-1)
        return [self.experts[self.groups[int(i)]] if float(s) >= self.floor else None
                for s, i in zip(best.values, best.indices)]

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        save_file({"vectors": self.vectors.contiguous()}, os.path.join(folder, "selector.safetensors"))
        with open(os.path.join(folder, "selector.json"), "w") as f:
            json.dump({"floor": self.floor, "experts": self.experts, "groups": self.groups,
                       "questions": self.questions}, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "Selector":
        from safetensors.torch import load_file

        with open(os.path.join(folder, "selector.json")) as f:
            meta = json.load(f)
        return cls(load_file(os.path.join(folder, "selector.safetensors"))["vectors"], meta["groups"],
                   meta["experts"], meta["floor"], meta.get("questions"))


def build_selector(examples: list[Example], groups: list[int], embed, floor: float = DEFAULT_FLOOR) -> Selector:
    qs, gs = [], []
    for ex, g in zip(examples, groups):
        for q in phrasings(last_user(ex.messages)):
            qs.append(q)
            gs.append(g)
    names = [f"expert-{j}" for j in range(max(groups) + 1)]
    return Selector(embed(qs), gs, names, floor, qs)


def train_experts(base, examples: list[Example], out: str, given: dict | None = None, experts="auto",
                  seed: int = 0, embed=None, floor: float = DEFAULT_FLOOR, max_len: int = 1024,
                  progress=None) -> tuple[Selector, list]:
    """Groups, trains one memory adapter per group (to the end, on this thread), saves the
    experts and the selector under `out`. Returns the selector and the trainers."""
    from .trainer import new_trainer

    embed = embed or Embedder()
    given = dict(given or {})
    groups = group_facts(examples, experts, embed)
    os.makedirs(out, exist_ok=True)
    selector = build_selector(examples, groups, embed, floor)
    trainers = []
    for j, name in enumerate(selector.experts):
        mine = [ex for ex, g in zip(examples, groups) if g == j]
        data = Dataset.of(base.tokenizer, augment(mine), max_len)
        t = new_trainer(base, data, given, seed + j, hyper=memory_hyperparameters(given, len(data.rows)))
        while not t.done:
            metrics = t.run_slice()
            if metrics and progress:
                progress(j, t, metrics)
        t.lora.save(os.path.join(out, name))
        trainers.append(t)
    selector.save(out)
    return selector, trainers
