"""`leanserve tune`: train a LoRA adapter on a chat-format JSONL file.

    leanserve tune FILE.jsonl [--method supervised|memory] [--output DIR]         # here, no server
    leanserve tune FILE.jsonl --base-url URL [--wait] [--suffix S]                # a server's fine-tuning API

Offline it trains on this machine (the built-in model, or --model) and writes a PEFT folder
that `leanserve serve --lora NAME=DIR` (or peft) loads. Against a server it uploads the file,
creates a job through the official `openai` client, and with --wait follows it to the end.
Both print a progress line on stderr every few seconds: steps, loss, tokens/s, elapsed, ETA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .cli import HelpFormatter
from .progress import Progress

FINAL = ("succeeded", "failed", "cancelled")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("file", metavar="FILE", help='one example per line: {"messages": [...]}')
    parser.add_argument("--method", default="supervised", choices=["supervised", "memory"],
                        help="supervised LoRA, or memory tuning (paraphrased questions, trained to near-zero loss, "
                             "per-fact recall reported)")
    parser.add_argument("--base-url", default=None, metavar="URL",
                        help="a server to run the job on (default: train here, without a server)")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="bearer key (default: $LEANSERVE_API_KEY)")
    parser.add_argument("--wait", action="store_true", help="with --base-url: follow the job until it ends")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="offline: the base model (HF folder or .gguf; default the built-in); "
                             "with --base-url: the served model's name (default: the server's first model)")
    parser.add_argument("--output", default=None, metavar="DIR", help="offline: where the adapter goes "
                        "(default ./leanserve-tune/<file stem>)")
    parser.add_argument("--validation-file", default=None, metavar="FILE")
    parser.add_argument("--suffix", default=None, help="with --base-url: part of the fine-tuned model's name")
    parser.add_argument("--n-epochs", default="auto", help="a number or auto")
    parser.add_argument("--batch-size", default="auto", help="a number or auto")
    parser.add_argument("--learning-rate-multiplier", default="auto", help="times 2e-4, or auto")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    return parser


def _hyper(args) -> dict:
    out = {}
    for name, cast in (("n_epochs", int), ("batch_size", int), ("learning_rate_multiplier", float)):
        value = getattr(args, name)
        if value != "auto":
            out[name] = cast(value)
    return out


def offline(args) -> int:
    from .energy.config import EnergyConfig, make_ledger
    from .energy.ledger import Work
    from .tune.data import Dataset, FileError, parse_jsonl
    from .tune.jobs import MAX_TRAIN_LEN
    from .tune.lora import BaseModel
    from .tune.memory import augment, memory_hyperparameters, recall_report
    from .tune.trainer import new_trainer

    try:
        examples = parse_jsonl(Path(args.file).read_bytes())
        valid = parse_jsonl(Path(args.validation_file).read_bytes()) if args.validation_file else None
    except FileError as e:
        print(f"error: {args.file}: {e.message}", file=sys.stderr)
        return 2
    base = BaseModel.load(args.model, MAX_TRAIN_LEN)
    given, hyper = _hyper(args), None
    if args.method == "memory":
        examples = augment(examples)
    data = Dataset.of(base.tokenizer, examples, MAX_TRAIN_LEN)
    if args.method == "memory":
        hyper = memory_hyperparameters(given, len(data.rows))
    vdata = Dataset.of(base.tokenizer, valid, MAX_TRAIN_LEN) if valid else None
    trainer = new_trainer(base, data, given, args.seed, vdata, hyper=hyper)
    ledger = make_ledger(EnergyConfig(), base.args)
    print(f"training {base.name}: {len(data.rows)} examples, {trainer.hyper.as_dict()}, {trainer.total_steps} steps",
          file=sys.stderr)
    bill = None
    with Progress(trainer.total_steps, "tune", unit="steps") as bar:
        while not trainer.done:
            before = trainer.trained_tokens
            with ledger.step([Work("tune", 1, 0, False)]):
                metrics = trainer.run_slice()
            bill = ledger.close("tune") if bill is None else bill + ledger.close("tune")
            if metrics is not None:
                bar.label = f"tune loss {metrics['train_loss']:.4f}"
                bar.advance(1, tokens=trainer.trained_tokens - before)
            else:
                bar.tokens += trainer.trained_tokens - before
                bar.tick()
    out = args.output or str(Path("leanserve-tune") / Path(args.file).stem)
    trainer.lora.save(out)
    summary = {"adapter": os.path.abspath(out), "trained_tokens": trainer.trained_tokens,
               "hyperparameters": trainer.hyper.as_dict(), "bill": bill.usage() if bill else None}
    if vdata is not None:
        summary["valid_loss"], summary["valid_mean_token_accuracy"] = trainer.evaluate(vdata)
    if args.method == "memory":
        report = recall_report(trainer)
        summary["recall"] = {k: v for k, v in report.items() if k != "per_fact"}
    print(json.dumps(summary, indent=2))
    return 0


def remote(args) -> int:
    from openai import OpenAI, OpenAIError

    key = args.api_key or os.environ.get("LEANSERVE_API_KEY", "").split(",")[0].strip() or "none"
    client = OpenAI(base_url=f"{args.base_url.rstrip('/')}/v1", api_key=key, max_retries=2)
    try:
        model = args.model or client.models.list().data[0].id
        with open(args.file, "rb") as f:
            train = client.files.create(file=(Path(args.file).name, f.read()), purpose="fine-tune")
        valid = None
        if args.validation_file:
            with open(args.validation_file, "rb") as f:
                valid = client.files.create(file=(Path(args.validation_file).name, f.read()), purpose="fine-tune").id
        hyper = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", **_hyper(args)}
        job = client.fine_tuning.jobs.create(model=model, training_file=train.id, validation_file=valid,
                                             suffix=args.suffix, seed=args.seed,
                                             method={"type": args.method, args.method: {"hyperparameters": hyper}})
    except OpenAIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(job.id)
    if not args.wait:
        return 0
    return follow(client, job.id, args.poll_seconds)


def follow(client, job_id: str, poll: float) -> int:
    """Progress from the job's newest metrics event until it ends; prints the job's result."""
    bar = None
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = client.fine_tuning.jobs.list_events(job_id, limit=1).data
        step = events[0].data if events and events[0].type == "metrics" else None
        if step:
            if bar is None:
                bar = Progress(step["total_steps"], "tune", unit="steps")
            bar.label = f"tune loss {step['train_loss']:.4f}"
            bar.tokens = job.trained_tokens or 0
            if step["step"] > bar.done:
                bar.advance(step["step"] - bar.done)
            bar.tick()
        if job.status in FINAL:
            if bar is not None:
                bar.close()
            break
        time.sleep(poll)
    extra = job.model_extra.get("leanserve") or {}
    print(json.dumps({"id": job.id, "status": job.status, "fine_tuned_model": job.fine_tuned_model,
                      "trained_tokens": job.trained_tokens, "error": job.error.model_dump() if job.error else None,
                      "bill": extra.get("bill"), "recall": {k: v for k, v in (extra.get("recall") or {}).items()
                                                            if k != "per_fact"} or None}, indent=2))
    return 0 if job.status == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _hyper(args)
    except ValueError:
        print("error: --n-epochs, --batch-size and --learning-rate-multiplier take a number or auto", file=sys.stderr)
        return 2
    return remote(args) if args.base_url else offline(args)
