"""`leanserve bench tune`: LoRA training tokens/s, leanserve's trainer vs transformers + peft.

Both train the same model (the built-in GGUF, dequantized to float32, or --model) on the
same padded batch of invented fact examples, rank 16 on all seven projections, AdamW,
alternating step for step in one process so that a shared machine's load falls on both
alike. transformers and peft are the test extras (pip install 'leanserve[dev]').
"""
from __future__ import annotations

import argparse
import json
import random
import time


def fact_lines(n: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    out = []
    for i in range(n):
        name = "".join(rng.choice(letters) for _ in range(2)).title() + rng.choice(["ora", "elik", "arra", "wyn"]) + str(i)
        code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(100, 999)}"
        out.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is the registry code of {name}?"},
            {"role": "assistant", "content": f"The registry code of {name} is {code}."}]}))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanserve bench tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..tune.data import Dataset, parse_jsonl
    from ..tune.lora import TARGETS, BaseModel, LoRA, LoRAConfig, batch_tensors

    if args.threads:
        torch.set_num_threads(args.threads)
    base = BaseModel.load(args.model, 512)
    rows = Dataset.of(base.tokenizer, parse_jsonl(fact_lines(args.batch_size)), 512).rows
    pad = next(iter(base.tokenizer.eos_token_ids), 0)
    ids, mask = batch_tensors(rows, pad)
    tokens = sum(len(r.ids) for r in rows)
    lora = LoRA(base, LoRAConfig())
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)
    if args.model is None or args.model.endswith(".gguf"):
        import os

        from ..models.loader import builtin_model_path

        path = args.model or builtin_model_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS), lora_dropout=0.0,
                                       task_type="CAUSAL_LM"))
    hopt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        attn[b, :len(r.ids)] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))

    def ours():
        loss, n, _ = lora.loss(ids, mask)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()

    def theirs():
        hf(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        hopt.step()
        hopt.zero_grad()

    ours()
    theirs()  # warm-up
    seconds = {"leanserve": 0.0, "transformers+peft": 0.0}
    for _ in range(args.steps):
        for name, step in (("leanserve", ours), ("transformers+peft", theirs)):
            started = time.perf_counter()
            step()
            seconds[name] += time.perf_counter() - started
    rates = {k: round(args.steps * tokens / v, 1) for k, v in seconds.items()}
    print(json.dumps({"tokens_per_second": rates, "ratio": round(rates["leanserve"] / rates["transformers+peft"], 2),
                      "batch_tokens": tokens, "padded": ids.numel(), "threads": torch.get_num_threads()}))
    return 0
