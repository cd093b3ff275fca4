"""`leanserve batch`: hand a JSONL file to a server's Batch API and follow it.

    leanserve batch submit requests.jsonl [--endpoint /v1/chat/completions] [--completion-window 24h]
                                          [--wait] [--base-url URL]
    leanserve batch status BATCH_ID [--base-url URL]

It talks to the server through the official `openai` client, as any user of the API would,
so it works against any OpenAI-compatible Batch API.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

FINAL = ("completed", "failed", "cancelled", "expired")
BAR_WIDTH = 30


def build_parser() -> argparse.ArgumentParser:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--base-url", default=os.environ.get("LEANSERVE_BASE_URL", "http://127.0.0.1:8000"),
                        help="the server (default: $LEANSERVE_BASE_URL or http://127.0.0.1:8000)")
    server.add_argument("--api-key", default=None,
                        help="bearer key (default: the first of $LEANSERVE_API_KEY, else none)")
    parser = argparse.ArgumentParser(prog="leanserve batch", description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", parents=[server], help="upload a JSONL file and create a batch")
    submit.add_argument("file", help="one request per line: {custom_id, method, url, body}")
    submit.add_argument("--endpoint", default="/v1/chat/completions",
                        choices=["/v1/chat/completions", "/v1/completions"])
    submit.add_argument("--completion-window", default="24h",
                        help="finish within this many hours, e.g. 24h (leanserve accepts 1h to 168h and may "
                             "defer the batch to cleaner hours inside it)")
    submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    submit.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    status = actions.add_parser("status", parents=[server], help="show a batch")
    status.add_argument("batch_id")
    return parser


def _client(args):
    from openai import OpenAI

    key = args.api_key or os.environ.get("LEANSERVE_API_KEY", "").split(",")[0].strip() or "none"
    return OpenAI(base_url=f"{args.base_url.rstrip('/')}/v1", api_key=key, max_retries=2)


def progress_line(batch) -> str:
    """`batch_abc  in_progress  [#########.....]  12/40  (1 failed)`"""
    counts = batch.request_counts
    total = counts.total if counts else 0
    done = counts.completed + counts.failed if counts else 0
    filled = BAR_WIDTH * done // total if total else 0
    failed = counts.failed if counts else 0
    return (f"{batch.id}  {batch.status:<11}  [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]  "
            f"{done}/{total}  ({failed} failed)")


def summary(batch) -> str:
    lines = [progress_line(batch)]
    base = "GET /v1/files/{}/content"
    if batch.output_file_id:
        lines.append(f"output: {batch.output_file_id}  ({base.format(batch.output_file_id)})")
    if batch.error_file_id:
        lines.append(f"errors: {batch.error_file_id}  ({base.format(batch.error_file_id)})")
    for error in (batch.errors.data if batch.errors and batch.errors.data else []):
        lines.append(f"error: {error.code}: {error.message}")
    plan = (batch.model_extra or {}).get("leanserve")  # leanserve's extension; other servers lack it
    if plan and plan.get("scheduled_start_at"):
        start = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(plan["scheduled_start_at"]))
        saved = plan.get("estimated_carbon_grams_saved")
        lines.append(f"scheduled start: {start}" + ("" if saved is None else f"  (est. {saved:.3g} g CO2e saved)"))
    return "\n".join(lines)


def follow(client, batch_id: str, poll_seconds: float, out) -> object:
    """Polls until the batch ends; on a terminal the progress line redraws in place."""
    live = out.isatty()
    shown = None
    while True:
        batch = client.batches.retrieve(batch_id)
        line = progress_line(batch)
        if line != shown:
            print(f"\r{line}" if live else line, end="" if live else "\n", file=out, flush=True)
            shown = line
        if batch.status in FINAL:
            if live:
                print(file=out)
            return batch
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    import openai

    args = build_parser().parse_args(argv)
    client = _client(args)
    try:
        if args.action == "status":
            print(summary(client.batches.retrieve(args.batch_id)))
            return 0
        with open(args.file, "rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=args.endpoint,
                                      completion_window=args.completion_window)
        print(batch.id)
        if not args.wait:
            return 0
        batch = follow(client, batch.id, args.poll_seconds, sys.stderr)
        print(summary(batch))
        return 0 if batch.status == "completed" else 1
    except OSError as e:
        print(f"leanserve batch: {e}", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        print(f"leanserve batch: {e.status_code}: {_message(e)}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as e:
        print(f"leanserve batch: cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # stop following; the batch runs on
        print(file=sys.stderr)
        return 130


def _message(error) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return body.get("message") or str(error)
