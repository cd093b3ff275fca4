"""`leanserve batch`: hand a JSONL file to a server's Batch API and follow it.

    leanserve batch submit requests.jsonl [--endpoint /v1/chat/completions] [--completion-window 24h]
                                          [--wait] [--base-url URL]
    leanserve batch status BATCH_ID [--base-url URL]

It talks to the server through the official `openai` client, as any user of the API would,
so it works against any OpenAI-compatible Batch API. `--wait` prints a progress line on stderr
every few seconds (done/total, requests/s, elapsed, ETA) and one when the batch ends.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .cli import HelpFormatter
from .progress import Progress

FINAL = ("completed", "failed", "cancelled", "expired")
BAR_WIDTH = 30


def build_parser() -> argparse.ArgumentParser:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--base-url", default=os.environ.get("LEANSERVE_BASE_URL", "http://127.0.0.1:8000"),
                        metavar="URL",
                        help="the server (default: $LEANSERVE_BASE_URL or http://127.0.0.1:8000)")
    server.add_argument("--api-key", default=None, metavar="KEY",
                        help="bearer key (default: the first of $LEANSERVE_API_KEY, else none)")
    parser = argparse.ArgumentParser(prog="leanserve batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help="submit or status; `leanserve batch ACTION --help` shows its flags")
    submit = actions.add_parser("submit", parents=[server], formatter_class=HelpFormatter,
                                help="upload a JSONL file and create a batch",
                                description="upload a JSONL file and create a batch")
    submit.add_argument("file", metavar="FILE", help="one request per line: {custom_id, method, url, body}")
    submit.add_argument("--endpoint", default="/v1/chat/completions",
                        choices=["/v1/chat/completions", "/v1/completions"],
                        help="the endpoint every line's url names")
    submit.add_argument("--completion-window", default="24h", metavar="WINDOW",
                        help="finish within this many hours, e.g. 24h (leanserve accepts 1h to 168h and may "
                             "defer the batch to cleaner hours inside it)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the batch until it ends: a progress line on stderr every few seconds, "
                             "then its files on stdout; exit status 0 only if it completed")
    submit.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    status = actions.add_parser("status", parents=[server], formatter_class=HelpFormatter,
                                help="show a batch", description="show a batch: its counts, files and errors")
    status.add_argument("batch_id", metavar="BATCH_ID", help="the id `submit` printed, e.g. batch_abc123")
    return parser


def _client(args):
    from openai import OpenAI

    key = args.api_key or os.environ.get("LEANSERVE_API_KEY", "").split(",")[0].strip() or "none"
    return OpenAI(base_url=f"{args.base_url.rstrip('/')}/v1", api_key=key, max_retries=2)


def _counts(batch) -> tuple[int, int, int]:
    """(total, done, failed) of the batch's lines; done counts the failed ones."""
    counts = batch.request_counts
    return (counts.total, counts.completed + counts.failed, counts.failed) if counts else (0, 0, 0)


def _plan(batch) -> dict:
    return (batch.model_extra or {}).get("leanserve") or {}  # leanserve's extension; other servers lack it


def progress_line(batch) -> str:
    """`batch_abc  in_progress  [#########.....]  12/40  (1 failed)`"""
    total, done, failed = _counts(batch)
    filled = BAR_WIDTH * done // total if total else 0
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
    plan = _plan(batch)
    if plan.get("scheduled_start_at"):
        start = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(plan["scheduled_start_at"]))
        saved = plan.get("estimated_carbon_grams_saved")
        lines.append(f"scheduled start: {start}" + ("" if saved is None else f"  (est. {saved:.3g} g CO2e saved)"))
    return "\n".join(lines)


class BatchProgress(Progress):
    """Progress of a batch's lines: `Progress`'s line with the failed ones and requests/s.

        batch_abc in_progress: 12/40 requests (1 failed), 2.40 req/s, elapsed 0:05, ETA 0:12
    """
    failed = 0

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self.clock() if now is None else now
        text = super().line(now, final)
        head = f"{self.label}: {self.done}/{self.total} {self.unit}"
        elapsed = now - self.start
        rate = f", {self.done / elapsed if elapsed > 0 else 0.0:.2f} req/s"
        return head + (f" ({self.failed} failed)" if self.failed else "") + rate + text[len(head):]


def waiting(batch, now: float) -> str | None:
    """What a batch that has not started running waits for, or None."""
    if batch.status == "validating":
        return "validating the input file"
    start = _plan(batch).get("scheduled_start_at") or 0
    if batch.status == "in_progress" and start > now:
        return f"deferred to a cleaner hour, scheduled start {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(start))}"
    return None


def follow(client, batch_id: str, poll_seconds: float, out, every: float = 5.0,
           clock=time.monotonic, sleep=time.sleep, wall=time.time) -> object:
    """Polls until the batch ends, with a `BatchProgress` line on `out` every `every` seconds
    and one at the end. While the batch waits (validation, a deferred start) a line says so
    once, and the clock of the progress starts when it stops waiting, so requests/s and the
    ETA are of the run."""
    progress = shown = None
    while True:
        batch = client.batches.retrieve(batch_id)
        total, done, failed = _counts(batch)
        wait = waiting(batch, wall())
        if wait and wait != shown:
            print(f"{batch.id} {batch.status}: {wait}", file=out, flush=True)
        shown = wait
        if progress is None or (wait and done == 0):
            progress = BatchProgress(total, batch.id, every=every, stream=out, clock=clock)
        progress.label, progress.total, progress.failed = f"{batch.id} {batch.status}", total, failed
        progress.advance(max(0, done - progress.done))
        if batch.status in FINAL:
            progress.close()
            return batch
        sleep(poll_seconds)


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
