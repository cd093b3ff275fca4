"""The command line on its own: --version, help text with defaults for every flag, serve's
flags into the configs, the data-directory lock's message, and the progress line of long
commands (on a fake clock; no model is loaded and no server started)."""
from __future__ import annotations

import argparse
import asyncio
import io
import re
from types import SimpleNamespace

import openai
import pytest

from leanserve import batch_cli, cli
from leanserve.bench import loadgen, offline
from leanserve.bench.report import RequestRecord
from leanserve.config import EngineConfig, ServerConfig
from leanserve.errors import LeanserveError
from leanserve.jobs.store import JobStore
from leanserve.progress import Progress, clock_text


def help_text(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"leanserve {cli.version()}" and re.fullmatch(r"leanserve \d+\.\d+\S*", out)


def options_without_help(text: str) -> list[str]:
    """The option lines of an argparse help text with no help after them: an option's help
    is on its own line after two spaces, or on the next line, indented further."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"  -", line):
            continue
        if re.match(r"  -\S.*?\S  +\S", line):  # "  --port N              the TCP port ..."
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r" {6,}[^ -]", following):
            missing.append(line.strip())
    return missing


def printed_help(argv, capsys, monkeypatch) -> tuple[str, argparse.ArgumentParser]:
    """`leanserve ARGV --help`'s text and the parser that printed it: bench and batch hand
    their arguments to parsers of their own."""
    printed, print_help = [], argparse.ArgumentParser.print_help

    def recording(self, file=None):
        printed.append(self)
        print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", recording)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0 and len(printed) == 1
    return capsys.readouterr().out, printed[0]


HELP_COMMANDS = [(), *((c,) for c in cli.COMMANDS), ("bench", "offline"), ("bench", "serve"), ("bench", "lora"),
                 ("batch", "submit"), ("batch", "status")]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda argv: " ".join(argv) or "leanserve")
def test_every_option_has_help(argv, capsys, monkeypatch):
    text, parser = printed_help(argv, capsys, monkeypatch)
    assert "options:" in text
    assert options_without_help(text) == []
    assert parser.prog == " ".join(["leanserve", *argv])
    assert isinstance(parser.formatter_class("x"), cli.HelpFormatter)
    for action in parser._actions:  # positionals too
        assert action.help, action.option_strings or action.dest
    assert "(default: None)" not in text and "(default: False)" not in text


def test_serve_help_shows_defaults(capsys):
    text = " ".join(help_text("serve", capsys=capsys).split())  # help lines unwrapped
    for flag, default in [("--port N", "8000"), ("--dtype {bfloat16,float16,float32}", "bfloat16"),
                          ("--host HOST", "127.0.0.1"), ("--max-seqs-per-client N", "512"),
                          ("--default-max-tokens N", "1024"), ("--max-sequences-per-request N", "256"),
                          ("--header-timeout-seconds N", "10.0"), ("--body-timeout-seconds N", "30.0"),
                          ("--max-waiting N", "1024")]:
        assert re.search(re.escape(flag) + r" [^-]*\(default: " + re.escape(default) + r"\)", text), flag
    assert "capped at 8192" in text
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: [])" not in text


def serve_configs(*argv: str) -> tuple[ServerConfig, EngineConfig]:
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli._server_config(args), cli._serve_engine_config(args)


def test_serve_defaults_are_the_configs(monkeypatch):
    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    monkeypatch.delenv("LEANSERVE_API_KEY_CLASSES", raising=False)
    server, engine = serve_configs()
    assert server == ServerConfig()
    d = EngineConfig()
    for name in ("max_model_len", "max_seqs_per_client", "max_waiting", "max_num_seqs", "dtype", "idle_unload_seconds"):
        assert getattr(engine, name) == getattr(d, name), name


def test_serve_flags_into_the_configs(monkeypatch):
    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    server, engine = serve_configs("--max-model-len", "2048", "--default-max-tokens", "64",
                                   "--max-sequences-per-request", "8", "--max-seqs-per-client", "16",
                                   "--header-timeout-seconds", "2.5", "--body-timeout-seconds", "7",
                                   "--host", "0.0.0.0", "--port", "9001", "--max-waiting", "5")
    assert (server.default_max_tokens, server.max_sequences_per_request) == (64, 8)
    assert (server.header_timeout_seconds, server.body_timeout_seconds) == (2.5, 7.0)
    assert (server.host, server.port) == ("0.0.0.0", 9001)
    assert (engine.max_model_len, engine.max_seqs_per_client, engine.max_waiting) == (2048, 16, 5)
    assert serve_configs("--default-max-tokens", "0")[0].default_max_tokens is None  # up to the context
    args = cli.build_parser().parse_args(["generate", "hi", "--max-model-len", "512"])
    assert cli._engine_config(args).max_model_len == 512


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len", "0"], "--max-model-len must be > 0"),
    (["--default-max-tokens", "-1"], "--default-max-tokens must be >= 0"),
    (["--max-sequences-per-request", "0"], "--max-sequences-per-request must be > 0"),
    (["--max-seqs-per-client", "0"], "--max-seqs-per-client must be > 0"),
    (["--header-timeout-seconds", "0"], "--header-timeout-seconds must be > 0"),
    (["--body-timeout-seconds", "-1"], "--body-timeout-seconds must be > 0"),
    (["--idle-unload-seconds", "0"], "--idle-unload-seconds must be > 0"),
])
def test_bad_serve_flags(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        serve_configs(*argv)


def test_a_second_store_on_one_directory_says_to_pass_data_dir(tmp_path):
    store = JobStore(tmp_path / "data")
    try:
        with pytest.raises(LeanserveError, match="in use by another leanserve process; pass --data-dir DIR"):
            JobStore(tmp_path / "data")
    finally:
        store.close()


# -- progress ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_every_few_seconds_and_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10, "bench test", every=5.0, stream=out, clock=clock)
    clock.now += 2
    p.advance(2, tokens=200)
    assert out.getvalue() == ""  # not yet 5 s
    clock.now += 3
    p.advance(2, tokens=200)  # 5 s: 4/10 done, 400 tokens
    assert out.getvalue() == "bench test: 4/10 requests, 80.0 tok/s, elapsed 0:05, ETA 0:08\n"
    clock.now += 1
    p.advance(1, tokens=100)
    p.tick()
    assert out.getvalue().count("\n") == 1  # the next line is due 5 s after the last one
    clock.now += 4
    p.tick()  # a line with no new request, for callers that wait on something else
    assert out.getvalue().splitlines()[-1] == "bench test: 5/10 requests, 50.0 tok/s, elapsed 0:10, ETA 0:10"
    clock.now += 6
    p.advance(5, tokens=500)  # all done: the last line is close()'s, not a periodic one
    assert out.getvalue().count("\n") == 2
    p.close()
    p.close()  # once
    lines = out.getvalue().splitlines()
    assert lines[-1] == "bench test: 10/10 requests, 62.5 tok/s, elapsed 0:16, done" and len(lines) == 3
    p.advance()
    p.tick()
    assert len(out.getvalue().splitlines()) == 3  # nothing after close


def test_progress_eta_from_tokens_when_no_request_has_finished():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(4, "run", stream=out, clock=clock, total_tokens=400)
    clock.now += 6
    p.advance(0, tokens=100)
    assert out.getvalue() == "run: 0/4 requests, 16.7 tok/s, elapsed 0:06, ETA 0:18\n"
    clock.now += 6
    q = Progress(3, "batch", stream=out, clock=clock)
    clock.now += 6
    q.tick()  # nothing done, no tokens counted: no rate, no ETA
    assert out.getvalue().splitlines()[-1] == "batch: 0/3 requests, elapsed 0:06, ETA ?"


def test_clock_text():
    assert [clock_text(s) for s in (0, 59.4, 61, 3599, 3600, 7384)] == \
        ["0:00", "0:59", "1:01", "59:59", "1:00:00", "2:03:04"]


def test_progress_writes_to_stderr_by_default(capsys):
    p = Progress(1, "x")
    p.advance(1)
    p.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("x: 1/1 requests, elapsed 0:00, done")


def test_bench_offline_counts_the_engine_steps():
    """run_leanserve counts each step's finished requests and new tokens, restores the
    engine's step and closes the progress; on a fake LLM whose generate steps the engine."""
    class Engine:
        def __init__(self):
            self.plan = [[(0, 2, False), (1, 2, False)], [(0, 2, True), (1, 2, True)]]

        def step(self):
            return [SimpleNamespace(request_id=i, token_ids=[7] * n, finished=f) for i, n, f in self.plan.pop(0)]

    class FakeLLM:
        engine = Engine()

        def generate(self, prompts, params):
            outs = [SimpleNamespace(token_ids=[]) for _ in prompts]
            while self.engine.plan:
                for out in self.engine.step():
                    outs[out.request_id].token_ids += out.token_ids
            return outs

    llm, clock, out = FakeLLM(), FakeClock(), io.StringIO()
    progress = Progress(2, "bench offline leanserve run 1/1", stream=out, clock=clock, total_tokens=8)
    assert offline.run_leanserve(llm, [[1], [2]], 4, progress) > 0
    assert (progress.done, progress.tokens, progress.closed) == (2, 8, True)
    assert out.getvalue().startswith("bench offline leanserve run 1/1: 2/2 requests,")
    assert "step" not in vars(llm.engine)  # the class's own step again


def test_bench_serve_level_advances_the_progress(monkeypatch):
    async def fake_send(client, url, body, timeout, index, t0):
        await asyncio.sleep(0)
        return RequestRecord(index, status=200, output_tokens=8) if body["ok"] else RequestRecord(index, error="x")

    monkeypatch.setattr(loadgen, "send", fake_send)
    out = io.StringIO()
    progress = Progress(5, "bench serve c=2", stream=out, total_tokens=40)
    bodies = [{"ok": i != 3} for i in range(5)]
    records, _ = asyncio.run(loadgen.run_level(None, "url", bodies, timeout=1, concurrency=2, rate=None, seed=0,
                                               progress=progress))
    assert len(records) == 5
    assert (progress.done, progress.tokens, progress.closed) == (5, 32, True)  # the failed one has no tokens
    assert out.getvalue().startswith("bench serve c=2: 5/5 requests, ")


def test_bench_and_batch_help_show_defaults(capsys, monkeypatch):
    for argv, flags in [
        (("bench", "offline"), [("--num-prompts N", "32"), ("--input-len N", "128"), ("--output-len N", "128"),
                                ("--dtype DTYPE", "bfloat16"), ("--repeats N", "3")]),
        (("bench", "lora"), [("--rank N", "8"), ("--cold-rank N", "16"), ("--repeats N", "3")]),
        (("bench", "serve"), [("--endpoint {completions,chat}", "completions"), ("--num-prompts N", "32")]),
        (("batch", "submit"), [("--endpoint {/v1/chat/completions,/v1/completions}", "/v1/chat/completions"),
                               ("--completion-window WINDOW", "24h")]),
    ]:
        text = " ".join(printed_help(argv, capsys, monkeypatch)[0].split())
        monkeypatch.undo()
        for flag, default in flags:
            assert re.search(re.escape(flag) + r" [^-]*\(default: " + re.escape(default) + r"\)", text), (argv, flag)
    assert "BATCH_ID the id" in " ".join(printed_help(("batch", "status"), capsys, monkeypatch)[0].split())


# -- batch submit --wait ----------------------------------------------------------------------

def a_batch(status: str, total: int = 0, completed: int = 0, failed: int = 0, **leanserve) -> openai.types.Batch:
    return openai.types.Batch.model_validate({
        "id": "batch_x", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-x",
        "completion_window": "24h", "status": status, "created_at": 0, "output_file_id": "file-out",
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        **({"leanserve": leanserve} if leanserve else {})})


class FakeBatches:
    """A server's batch, one state per poll; `sleep` moves the fake clock on."""
    def __init__(self, states, clock=None):
        self.states, self.clock, self.polls = list(states), clock, 0

    def retrieve(self, batch_id):
        assert batch_id == "batch_x"
        self.polls += 1
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def create(self, **kwargs):
        return a_batch("validating")

    def sleep(self, seconds):
        self.clock.now += seconds


def test_batch_wait_shows_rate_elapsed_and_eta_every_few_seconds():
    clock, out = FakeClock(), io.StringIO()
    done = [0, 0, 2, 4, 4, 5, 6, 8, 9, 9]  # at t = 1 ... 10 s after validating; a line fails from t = 6
    states = [a_batch("validating"), *(a_batch("in_progress", 10, n - (n >= 6), int(n >= 6)) for n in done),
              a_batch("finalizing", 10, 9, 1), a_batch("completed", 10, 9, 1)]
    batches = FakeBatches(states, clock)
    batch = batch_cli.follow(SimpleNamespace(batches=batches), "batch_x", 1.0, out, clock=clock,
                             sleep=batches.sleep, wall=lambda: 0.0)
    assert batch.status == "completed" and batches.polls == 13
    assert out.getvalue().splitlines() == [
        "batch_x validating: validating the input file",
        "batch_x in_progress: 4/10 requests, 0.80 req/s, elapsed 0:05, ETA 0:08",  # t = 5
        "batch_x in_progress: 9/10 requests (1 failed), 0.90 req/s, elapsed 0:10, ETA 0:01",  # t = 10
        "batch_x completed: 10/10 requests (1 failed), 0.83 req/s, elapsed 0:12, done",  # t = 12
    ]


def test_batch_wait_counts_the_run_from_a_deferred_start():
    """A batch deferred to a cleaner hour: one line says until when, and the rate, elapsed
    time and ETA are of the run, not of the wait."""
    clock, out = FakeClock(), io.StringIO()
    base, start = 1_767_268_800 - 100, 1_767_268_800 + 3600  # start: 2026-01-01 13:00:00Z, 3599 s after poll 4
    deferred = [a_batch("in_progress", 4, n, scheduled_start_at=start) for n in (0, 0, 0, 0, 1, 1, 2, 2, 2)]
    batches = FakeBatches([a_batch("validating"), *deferred, a_batch("completed", 4, 4, scheduled_start_at=start)],
                          clock)

    def sleep(seconds):  # polls 1 to 4 at t = 0, 1, 1801, 3599 s; then every second
        clock.now += {2: 1800, 3: 1798}.get(batches.polls, seconds)

    batch_cli.follow(SimpleNamespace(batches=batches), "batch_x", 1.0, out, clock=clock, sleep=sleep,
                     wall=lambda: base + clock.now)
    assert out.getvalue().splitlines() == [
        "batch_x validating: validating the input file",
        "batch_x in_progress: deferred to a cleaner hour, scheduled start 2026-01-01 13:00:00Z",
        "batch_x in_progress: 2/4 requests, 0.40 req/s, elapsed 0:05, ETA 0:05",
        "batch_x completed: 4/4 requests, 0.57 req/s, elapsed 0:07, done",
    ]


def test_batch_submit_wait_prints_the_progress_and_the_summary(monkeypatch, tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text("{}\n")
    batches = FakeBatches([a_batch("in_progress", 2), a_batch("in_progress", 2, 1), a_batch("completed", 2, 2)])
    client = SimpleNamespace(batches=batches, files=SimpleNamespace(create=lambda **kw: SimpleNamespace(id="file-x")))
    monkeypatch.setattr(batch_cli, "_client", lambda args: client)
    assert batch_cli.main(["submit", str(path), "--wait", "--poll-seconds", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "batch_x" and "output: file-out" in out
    assert re.fullmatch(r"batch_x completed: 2/2 requests, [\d.]+ req/s, elapsed 0:00, done\n", err)
