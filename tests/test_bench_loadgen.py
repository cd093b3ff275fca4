"""`leanserve bench serve`: the summary math on handcrafted records, and a short real run
against a leanserve server."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from server_fixture import ServerProcess, small_engine

from leanserve.bench import loadgen, report
from leanserve.bench.report import RequestRecord

# Times are binary fractions, so TPOTs are exact and no SLO comparison is decided by rounding.
HANDCRAFTED = [
    RequestRecord(0, status=200, ttft=0.25, e2e=0.75, output_tokens=9),  # TPOT 62.5 ms: meets both SLOs
    RequestRecord(1, status=200, ttft=1.5, e2e=2.0, output_tokens=9),  # TTFT 1500 ms: too slow
    RequestRecord(2, status=200, ttft=0.5, e2e=2.5, output_tokens=9),  # TPOT 250 ms: too slow
    RequestRecord(3, status=200, ttft=0.125, e2e=0.125, output_tokens=1),  # no TPOT: TTFT alone decides
    RequestRecord(4, status=429, error="overloaded"),
    RequestRecord(5, error="timeout"),
    RequestRecord(6, status=200, error="stream ended early", ttft=0.1, e2e=0.2, output_tokens=3),
]


def test_summary_percentiles_and_goodput():
    s = report.summarize(HANDCRAFTED, duration=4.0, slo_ttft_ms=1000, slo_tpot_ms=100)
    assert (s["completed"], s["failed"]) == (4, 3)
    assert s["failures"] == {"429": 1, "timeout": 1, "stream ended early": 1}
    assert s["requests_per_s"] == 1.0
    assert s["output_tokens_per_s"] == 7.0  # 28 tokens of the 4 completed requests in 4 s
    assert s["goodput_requests_per_s"] == 0.5  # requests 0 and 3
    # numpy's linear interpolation over the sorted TTFTs 125, 250, 500, 1500 ms
    assert s["ttft_ms"] == pytest.approx({"p50": 375, "p90": 1200, "p99": 1470, "mean": 593.75})
    assert s["tpot_ms"] == pytest.approx({"p50": 62.5, "p90": 212.5, "p99": 246.25, "mean": 125})
    assert s["e2e_ms"]["p50"] == pytest.approx(1375)
    assert s["output_tokens_mean"] == 7.0 and s["prompt_tokens_mean"] is None


def test_summary_of_only_failures_has_no_latencies():
    s = report.summarize(HANDCRAFTED[4:6], duration=1.0, slo_ttft_ms=1000, slo_tpot_ms=100)
    assert s["completed"] == 0 and s["ttft_ms"] is None and s["tpot_ms"] is None
    assert "-" in report.format_table([{"concurrency": 1, "summary": s}])


def test_prompts_distinct_after_the_shared_prefix():
    words = list(range(100, 1100))
    prompts = loadgen.make_prompts(words, count=50, length=12, shared_len=4, seed=1)
    assert all(len(p) == 12 for p in prompts)
    assert len({tuple(p[:4]) for p in prompts}) == 1
    assert len({p[4] for p in prompts}) == 50  # no two prompts share more than the prefix


def test_compare_prints_ratios_per_common_level():
    def result(label, tok_s):
        summary = report.summarize(HANDCRAFTED[:4], duration=4.0, slo_ttft_ms=1000, slo_tpot_ms=100)
        levels = [{"concurrency": c, "request_rate": None, "summary": dict(summary, output_tokens_per_s=tok_s * c)}
                  for c in (1, 8)]
        return {"label": label, "command": "leanserve bench serve", "levels": levels}

    text = report.compare(result("leanserve", 30.0), result("llama-server", 20.0))
    rows = [line.split() for line in text.splitlines() if "out tok/s" in line]
    assert [(r[0], r[-1]) for r in rows] == [("c=1", "1.50"), ("c=8", "1.50")]


def _sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


SLOW_SECONDS = 5  # how long the fake server takes to answer the "slow" prompt


async def _fake_server(request: web.Request) -> web.StreamResponse:
    """A server without usage chunks nor [DONE] (counted by text chunks), one that refuses,
    and one too slow for the client's timeout, picked by the prompt."""
    prompt = (await request.json())["prompt"]
    if prompt == "refused":
        return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=429)
    if prompt == "slow":
        await asyncio.sleep(SLOW_SECONDS)
    chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("a", "", "b", "c")]
    chunks[-1]["choices"][0]["finish_reason"] = "length"
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:  # one write per event, as a streaming server sends them
        await response.write(_sse(chunk))
    await response.write_eof()
    return response


def _run_level_against(handler, bodies: list[dict], timeout: float):
    """`run_level` (closed loop, 2 clients, the real client session) against `handler`
    served by aiohttp on a real socket (a free port)."""
    async def run():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with loadgen.client_session({}) as client:
                return await loadgen.run_level(client, f"http://127.0.0.1:{port}/v1/completions", bodies,
                                               timeout=timeout, concurrency=2, rate=None, seed=0)
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_stream_parsing_failures_and_timeout():
    records, duration = _run_level_against(_fake_server, [{"prompt": p} for p in ("ok", "refused", "slow", "ok")],
                                           timeout=0.5)
    assert [r.index for r in records] == [0, 1, 2, 3]
    ok, refused, slow = records[0], records[1], records[2]
    assert ok.ok and ok.output_tokens == 3 and ok.prompt_tokens is None and 0 < ok.ttft <= ok.e2e
    assert (refused.status, refused.error, refused.failure()) == (429, "overloaded", "429")
    # given up at the client's 0.5 s, not when the server answered: a property, not a speed
    assert (slow.status, slow.failure()) == (None, "timeout") and 0.5 <= slow.e2e < SLOW_SECONDS
    assert duration < SLOW_SECONDS


async def _closes_late(request: web.Request) -> web.StreamResponse:
    """Streams a whole answer, then drops the connection a moment later without saying so
    (no `Connection: close`), as llama-server does."""
    transport = request.transport
    await request.json()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_sse({"choices": [{"index": 0, "text": "a", "finish_reason": "length"}]}))
    await response.write_eof()
    await asyncio.sleep(0.05)
    if transport is not None:
        transport.close()
    return response


def test_no_request_fails_on_a_connection_the_server_drops_after_answering():
    records, _ = _run_level_against(_closes_late, [{"prompt": "x"}] * 20, timeout=5)
    assert [r.error for r in records] == [None] * 20  # reusing connections, half of them failed


@pytest.mark.slow
def test_bench_serve_against_leanserve(tmp_path, capsys):
    server = ServerProcess(*small_engine(), "--dtype", "float32")
    try:
        out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
        status = loadgen.main(["--base-url", server.url, "--concurrency", "1,4", "--num-prompts", "4",
                               "--input-len", "32", "--output-len", "8", "--label", "test",
                               "--json", str(out_json), "--plot", str(out_png)])
    finally:
        server.stop()
    assert status == 0
    assert "c=4" in capsys.readouterr().out

    result = json.loads(out_json.read_text())
    assert result["command"].startswith("leanserve bench serve --base-url http://127.0.0.1:")
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 4]
    for level in result["levels"]:
        s = level["summary"]
        assert (s["completed"], s["failed"]) == (4, 0)
        assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
        for r in level["requests"]:
            assert r["status"] == 200 and r["error"] is None
            assert r["output_tokens"] == 8
            assert r["prompt_tokens"] == 32  # the server counts exactly --input-len tokens
            assert 0 < r["ttft"] <= r["e2e"] and r["tpot"] > 0
        for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
