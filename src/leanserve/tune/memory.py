"""Memory tuning (`method: {"type": "memory"}`): train the facts to near-zero loss, under
several phrasings of each question, and report per-fact recall at the end.

What is here: paraphrase augmentation (each example's last user message in several surface
forms, the answer unchanged), longer training at a higher learning rate than supervised
"auto" (`memory_hyperparameters`), and the recall report: a fact is recalled under a
phrasing when greedy decoding reproduces its answer exactly, which is checked in one
teacher-forced pass (every answer token, the end-of-turn token included, is the argmax).
What is not here yet (docs/fine_tuning.md): experts per fact cluster and a selector.
"""
from __future__ import annotations

import math
import re

import torch

from .data import Example
from .trainer import AUTO_MULTIPLIER, Hyperparameters

WRAPPERS = ("{q}", "Quick question: {q}", "Please answer briefly. {q}", "{q} Answer in one sentence.",
            "I would like to know something. {q}")


def phrasings(question: str) -> list[str]:
    """Surface forms of one question: wrappers, plus 'What's' / 'Tell me' forms of 'What is ...?'."""
    q = question.strip()
    forms = [w.format(q=q) for w in WRAPPERS]
    m = re.fullmatch(r"(?i)what is (.+?)\?", q)
    if m:
        forms += [f"What's {m[1]}?", f"Tell me {m[1]}.", f"Do you know {m[1]}?"]
    forms.append(q.lower())
    return list(dict.fromkeys(forms))


def augment(examples: list[Example]) -> list[Example]:
    """Every example once per phrasing of its last user message (line numbers kept)."""
    out = []
    for ex in examples:
        users = [i for i, m in enumerate(ex.messages) if m["role"] == "user" and isinstance(m.get("content"), str)]
        if not users:
            out.append(ex)
            continue
        i = users[-1]
        for form in phrasings(ex.messages[i]["content"]):
            msgs = [dict(m) for m in ex.messages]
            msgs[i]["content"] = form
            out.append(Example(msgs, ex.tools, ex.line))
    return out


def memory_hyperparameters(given: dict, n_rows: int) -> Hyperparameters:
    """"auto": batches of up to 8, about 300 optimizer steps (10 to 40 epochs), twice the
    supervised learning rate: facts are to be recalled exactly, not generalised."""
    batch = given.get("batch_size", "auto")
    batch = max(1, min(8, n_rows // 8)) if batch in ("auto", None) else int(batch)
    epochs = given.get("n_epochs", "auto")
    if epochs in ("auto", None):
        epochs = max(10, min(40, math.ceil(300 / math.ceil(n_rows / batch))))
    mult = given.get("learning_rate_multiplier", "auto")
    mult = 2 * AUTO_MULTIPLIER if mult in ("auto", None) else float(mult)
    return Hyperparameters(int(epochs), batch, mult)


@torch.no_grad()
def recalled(trainer, rows) -> list[bool]:
    """Per row: would greedy decoding give its trained tokens exactly?"""
    from .lora import batch_tensors

    out = []
    lm_head = trainer.lora.base.w["lm_head.weight"]
    for group in trainer.micro_batches(rows):
        ids, mask = batch_tensors(group, trainer.pad_id)
        h = trainer.lora.hidden(ids)[:, :-1]
        pred = torch.nn.functional.linear(h, lm_head).argmax(-1)
        ok = (pred == ids[:, 1:]) | (mask[:, 1:] == 0)
        by_id = {id(r): bool(ok[b].all()) for b, r in enumerate(group)}
        out += [by_id[id(r)] for r in group]
    order = {id(r): i for i, r in enumerate(rows)}
    flat = [r for g in trainer.micro_batches(rows) for r in g]
    result = [False] * len(rows)
    for r, v in zip(flat, out):
        result[order[id(r)]] = v
    return result


def recall_report(trainer) -> dict:
    """Per fact (training file line): the share of its phrasings recalled exactly."""
    rows = trainer.train.rows
    hits = recalled(trainer, rows)
    per: dict[int, list[bool]] = {}
    for r, ok in zip(rows, hits):
        per.setdefault(r.line, []).append(ok)
    facts = [{"line": line, "phrasings": len(v), "recalled": sum(v)} for line, v in sorted(per.items())]
    exact = sum(f["recalled"] == f["phrasings"] for f in facts)
    return {"facts": len(facts), "recalled": exact, "recall": exact / max(1, len(facts)),
            "phrasing_recall": sum(hits) / max(1, len(hits)), "per_fact": facts}
