"""`leanserve bench facts`: recall of invented facts, base vs retrieval vs supervised LoRA vs memory experts.

Invented facts (fictional entities x attributes, random codes) are trained with the
"What is the <attribute> of <entity>?" template and tested with held-out templates. Per
system: exact-match accuracy (the answer contains the fact's value), hallucination rate
(a wrong answer that is not "I don't know"), retention on a control set of questions the
base answers (bench/data/facts_control.json: the share of the base's correct control answers
still correct), and the joules of training (the process's CPU-time estimate meter).
Retrieval puts the 3 nearest fact sentences (all-MiniLM-L6-v2, the store's embedding model,
in memory here) in a system message. Memory tuning is tune/experts.py: clustered experts and
the selector, the experts and the base in one batch of the multi-LoRA engine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ATTRIBUTES = ("registry code", "harbor code", "archive number")
HELD_OUT = ("Could you tell me the {a} of {e}?", "I need the {a} of {e}.", "{e}: what is its {a}?")
UNKNOWN = ("don't know", "do not know", "not sure", "no information", "cannot", "can't", "unknown")


def invent(n: int, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    out = []
    for i in range(n):
        ent = rng.choice(letters) + rng.choice("aeiou") + rng.choice(["lmora", "zelik", "nbarra", "quendral", "rowick"])
        ent = f"{ent}{i}"
        attr = ATTRIBUTES[i % len(ATTRIBUTES)]
        code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(100, 999)}"
        out.append({"entity": ent, "attribute": attr, "value": code})
    return out


def train_lines(facts) -> str:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is the {f['attribute']} of {f['entity']}?"},
        {"role": "assistant", "content": f["value"]}]}) + "\n" for f in facts)


def score(answers: list[str], facts: list[dict]) -> tuple[float, float]:
    right = [f["value"].lower() in a.lower() for a, f in zip(answers, facts)]
    wrong = [not r and not any(u in a.lower() for u in UNKNOWN) for a, r in zip(answers, right)]
    return sum(right) / len(right), sum(wrong) / len(wrong)


def control_ok(answers: list[str], control) -> list[bool]:
    return [any(x.lower() in a.lower() for x in want.split("|")) for a, (_, want) in zip(answers, control)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanserve bench facts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--experts", default="auto")
    parser.add_argument("--epochs", default="auto", help="n_epochs of both trainings (auto: tune/ defaults)")
    parser.add_argument("--lr-multiplier", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="leanserve-bench-facts")
    args = parser.parse_args(argv)

    import torch

    from ..energy.meters import EstimateMeter
    from ..engine.llm import LLM
    from ..engine.sequence import SamplingParams
    from ..serve.app import chat_prompt_ids
    from ..tune.data import Dataset, parse_jsonl
    from ..tune.experts import Embedder, train_experts
    from ..tune.lora import BaseModel
    from ..tune.trainer import new_trainer

    torch.set_num_threads(args.threads)
    say = lambda msg: print(f"bench facts: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    facts = invent(args.facts)
    control = json.load(open(os.path.join(os.path.dirname(__file__), "data", "facts_control.json")))
    examples = parse_jsonl(train_lines(facts))
    given = {k: v for k, v in (("n_epochs", args.epochs), ("learning_rate_multiplier", args.lr_multiplier))
             if v != "auto"}
    given = {k: (int(v) if k == "n_epochs" else float(v)) for k, v in given.items()}
    meter, embed = EstimateMeter(), Embedder()
    base = BaseModel.load(args.model, 512)
    os.makedirs(args.output, exist_ok=True)

    say(f"supervised LoRA on {len(facts)} facts")
    j0, t0 = meter.read_joules(), time.monotonic()
    sup = new_trainer(base, Dataset.of(base.tokenizer, examples, 512), given, seed=1)
    while not sup.done:
        m = sup.run_slice()
        if m and m["step"] % 10 == 0:
            say(f"supervised step {m['step']}/{sup.total_steps} loss {m['train_loss']:.4f}")
    sup.lora.save(os.path.join(args.output, "supervised"))
    sup_j, sup_s = meter.read_joules() - j0, time.monotonic() - t0

    say("memory experts")
    j0, t0 = meter.read_joules(), time.monotonic()
    progress = lambda j, t, m: m["step"] % 10 == 0 and say(  # noqa: E731
        f"expert {j} step {m['step']}/{t.total_steps} loss {m['train_loss']:.4f}")
    sel, trainers = train_experts(base, examples, os.path.join(args.output, "memory"), given, args.experts,
                                  seed=1, embed=embed, progress=progress)
    mem_j, mem_s = meter.read_joules() - j0, time.monotonic() - t0
    del base

    adapters = {"supervised": os.path.join(args.output, "supervised")}
    adapters.update({n: os.path.join(args.output, "memory", n) for n in sel.experts})
    llm = LLM(args.model, dtype="float32", lora={"adapters": adapters, "max_loras": len(adapters)})
    params = SamplingParams(temperature=0, max_tokens=16)
    held = [(t.format(a=f["attribute"], e=f["entity"]), f) for t in HELD_OUT for f in facts]
    qs = [q for q, _ in held]
    hfacts = [f for _, f in held]
    sentences = [f"The {f['attribute']} of {f['entity']} is {f['value']}." for f in facts]
    svec = embed(sentences)

    def ask(questions, adapter=None, context=False):
        msgs = []
        for q in questions:
            m = [{"role": "user", "content": q}]
            if context:
                top = (embed([q]) @ svec.T)[0].topk(min(3, len(sentences))).indices.tolist()
                m.insert(0, {"role": "system", "content": "Facts: " + " ".join(sentences[i] for i in top)})
            msgs.append(m)
        prompts = [chat_prompt_ids(llm.tokenizer, m) for m in msgs]
        ads = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        return [o.text for o in llm.generate(prompts, params, adapter=ads)]

    cq = [q for q, _ in control]
    rows = []
    base_control = control_ok(ask(cq), control)
    for name, kw, j, s in (("base", {}, 0.0, 0.0), ("base + retrieval", {"context": True}, 0.0, 0.0),
                           ("supervised LoRA", {"adapter": "supervised"}, sup_j, sup_s),
                           ("memory experts", "memory", mem_j, mem_s)):
        say(f"asking {name}")
        if kw == "memory":
            answers = ask(qs, sel.select(qs, embed))
            ctrl = control_ok(ask(cq, sel.select(cq, embed)), control)
        else:
            answers = ask(qs, **kw)
            ctrl = control_ok(ask(cq, **kw), control)
        acc, hall = score(answers, hfacts)
        kept = sum(c and b for c, b in zip(ctrl, base_control)) / max(1, sum(base_control))
        rows.append({"system": name, "exact_match": acc, "hallucination": hall, "retention": kept,
                     "train_joules": round(j, 1), "train_seconds": round(s, 1)})
    print("| system | held-out exact match | hallucination | retention (control) | training J | training s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['exact_match']:.0%} | {r['hallucination']:.0%} | {r['retention']:.0%} | "
              f"{r['train_joules']} | {r['train_seconds']} |")
    print(json.dumps({"facts": len(facts), "held_out_questions": len(qs), "experts": len(sel.experts),
                      "supervised_hyperparameters": sup.hyper.as_dict(),
                      "expert_hyperparameters": trainers[0].hyper.as_dict(), "rows": rows}))
    return 0
