"""`leanserve bench serve` energy: the CPU-time meter over other processes (/proc), a bad
pid, the J/token rows of tables and comparisons, and a short real run against a leanserve
server measured both by its own /metrics and by its pid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from server_fixture import ServerProcess, small_engine

from leanserve import cli
from leanserve.bench import loadgen, report
from leanserve.energy.meters import EstimateMeter, MeterUnavailable, ProcessesMeter

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def _burn(seconds: float) -> None:
    exec(BURN.format(seconds=seconds))


def test_cpu_time_of_this_process_matches_process_time():
    meter = ProcessesMeter([os.getpid()], children=False, watts_per_core=10.0, watts_per_gb=0.0)
    t0 = time.process_time()
    _burn(0.4)
    burnt = time.process_time() - t0
    assert meter.cpu_seconds() == pytest.approx(burnt, abs=0.05)  # /proc counts in 10 ms ticks
    joules, seconds = meter.read_joules(), meter.cpu_seconds()  # two reads: a tick may fall between
    assert joules == pytest.approx(10.0 * seconds, abs=10.0 * 0.011)


def test_same_formula_as_the_estimate_meter():
    """Over the same process, the pid meter and leanserve's own estimate meter agree."""
    own = EstimateMeter(watts_per_core=7.0, watts_per_gb=0.375)
    by_pid = ProcessesMeter([os.getpid()], children=False, watts_per_core=7.0, watts_per_gb=0.375)
    _burn(0.2)
    j_own, j_pid = own.read_joules(), by_pid.read_joules()
    assert j_pid == pytest.approx(j_own, rel=0.1) and j_pid > 1.0


def test_children_are_counted_also_after_they_exit():
    """A child burns CPU and exits: counted with children (reaped: cutime), not without."""
    with_children = ProcessesMeter([os.getpid()], children=True, watts_per_core=1.0, watts_per_gb=0.0)
    alone = ProcessesMeter([os.getpid()], children=False, watts_per_core=1.0, watts_per_gb=0.0)
    child = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=0.5)])
    time.sleep(0.2)
    mid = with_children.cpu_seconds()  # while it runs: its own CPU time, as a live descendant
    child.wait()
    assert with_children.cpu_seconds() >= 0.45 and with_children.cpu_seconds() >= mid
    assert alone.cpu_seconds() < 0.3  # this process only sleeps and waits


@pytest.mark.parametrize("pid", [999_999_999, 0, -5])
def test_bad_pid_is_a_clear_error(pid, capsys):
    with pytest.raises(MeterUnavailable, match=f"no process with pid {pid}"):
        ProcessesMeter([pid])
    status = cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:1", f"--measure-pid={pid}"])
    assert status == 1
    assert f"no process with pid {pid}" in capsys.readouterr().err


def test_energy_rows_in_table_and_comparison():
    summary = {"completed": 1, "failed": 0, "failures": {}, "requests_per_s": 1.0, "output_tokens_per_s": 100.0,
               "goodput_requests_per_s": 1.0, "ttft_ms": None, "tpot_ms": None, "e2e_ms": None}
    server = report.server_energy({"total_j": 10.0, "idle_j": 1.0, "energy_source": "estimate"},
                                  {"total_j": 30.0, "idle_j": 5.0, "energy_source": "estimate"}, 400)
    assert server == {"energy_source": "estimate", "active_j": 16.0, "idle_j": 4.0, "total_j": 20.0,
                      "j_per_output_token": 0.05, "active_j_per_output_token": 0.04}
    lean = {"label": "leanserve", "command": "a", "levels": [{"concurrency": 8, "summary": dict(
        summary, energy={"server": server, "pid": report.pid_energy(24.0, 2.0, 400, pids=[1])})}]}
    llama = {"label": "llama-server", "command": "b", "levels": [{"concurrency": 8, "summary": dict(
        summary, energy={"pid": report.pid_energy(120.0, 10.0, 400, pids=[2])})}]}

    table = report.format_table(lean["levels"])
    assert "server /metrics" in table and "CPU time of pids" in table and "0.0600" in table
    rows = {line.split()[1] + " " + line.split()[2]: line.split() for line in report.compare(lean, llama).splitlines()
            if "J/tok" in line}
    assert rows["J/tok pid"][-3:] == ["0.0600", "0.3000", "0.20"]
    assert rows["J/tok server"][-3:] == ["0.0500", "-", "-"]
    # runs without energy compare as before: no J/tok rows
    assert "J/tok" not in report.compare(llama | {"levels": [{"concurrency": 8, "summary": summary}]},
                                         llama | {"levels": [{"concurrency": 8, "summary": summary}]})


@pytest.mark.slow
def test_bench_serve_energy_against_leanserve(tmp_path, capsys):
    server = ServerProcess(*small_engine(), "--dtype", "float32", "--energy-meter", "estimate",
                           "--watts-per-core", "10")
    args = ["--base-url", server.url + "/v1", "--concurrency", "2", "--num-prompts", "4", "--input-len", "32",
            "--output-len", "8", "--measure-pid", str(server.proc.pid), "--watts-per-core", "10"]
    try:
        out_json, again_json = tmp_path / "run.json", tmp_path / "again.json"
        status = loadgen.main(args + ["--json", str(out_json)])
        out = capsys.readouterr()
        # The same arguments again: the same prompts, now in the server's prefix cache.
        again = loadgen.main(args + ["--json", str(again_json)])
        repeated = capsys.readouterr()
    finally:
        server.stop()
    assert status == 0 and again == 0
    assert "server /metrics" in out.out and "CPU time of pids" in out.out
    first_rate = json.loads(out_json.read_text())["levels"][0]["prefix_cache_hit_rate"]
    second_rate = json.loads(again_json.read_text())["levels"][0]["prefix_cache_hit_rate"]
    assert first_rate == 0.0 and "prefix cache supplied" not in out.err
    assert second_rate > 0.4 and "prefix cache supplied" in repeated.err

    energy = json.loads(out_json.read_text())["levels"][0]["summary"]["energy"]
    assert energy["output_tokens"] == 32
    by_server, by_pid = energy["server"], energy["pid"]
    assert by_server["energy_source"] == "estimate" and by_pid["energy_source"] == "estimate"
    assert by_server["j_per_output_token"] > 0 and by_pid["j_per_output_token"] > 0
    assert by_server["total_j"] == pytest.approx(by_server["active_j"] + by_server["idle_j"], abs=1e-3)
    assert by_server["active_j"] > 0 and by_pid["cpu_s"] > 0 and by_pid["pids"] == [server.proc.pid]
    # the same process and the same formula: the two figures agree to an order of magnitude
    assert 0.2 < by_pid["total_j"] / by_server["total_j"] < 5
