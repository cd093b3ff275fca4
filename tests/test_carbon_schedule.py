"""Carbon-aware deferral: forecast parsing, the choice of start hour, the plan's saving, and
the scheduled start kept in SQLite across a reopen."""
from __future__ import annotations

import math

import pytest

from leanserve.jobs import JobsConfig
from leanserve.jobs.carbon_schedule import (Forecast, choose_start, load_forecast, parse_forecast, plan_batch,
                                            window_seconds)
from leanserve.jobs.store import InputLine, JobStore
from leanserve.jobs.worker import estimated_tokens

H = 3600
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z

# A day of a grid with a solar dip: dirty overnight, cleanest 11:00-14:00, dirty in the evening.
DAY = [420, 410, 400, 400, 390, 380, 350, 300, 250, 200, 150, 90, 80, 85, 140, 220, 300, 380, 450, 470,
       460, 450, 440, 430]
FIXTURE = "timestamp,gco2e_per_kwh\n" + "".join(
    f"2026-01-01T{h:02d}:00:00Z,{v}\n" for h, v in enumerate(DAY))


@pytest.fixture
def forecast() -> Forecast:
    return parse_forecast(FIXTURE)


def test_parses_iso_hours_with_a_header(forecast):
    assert forecast.times[0] == T0 and forecast.times[-1] == T0 + 23 * H
    assert forecast.values == tuple(float(v) for v in DAY)
    assert forecast.at(T0 + 12 * H + 1800) == 80  # a value holds until the next row
    assert forecast.at(T0 - H) == 420 and forecast.at(T0 + 30 * H) == 430  # first / last beyond the ends


def test_parsing_is_robust_to_what_files_contain(tmp_path):
    text = ("\ufeff# an hourly forecast\n"
            "2026-01-01T01:00:00+01:00, 300\n"  # a zone: 00:00 UTC
            "\n"
            f"{T0 + 2 * H},100\r\n"  # unix seconds, CRLF, out of order
            "2026-01-01 01:00,200\n")  # a space, no zone: UTC
    path = tmp_path / "f.csv"
    path.write_text(text, encoding="utf-8")
    f = load_forecast(str(path))  # BOM and header-less
    assert f.times == (T0, T0 + H, T0 + 2 * H) and f.values == (300, 200, 100)
    with pytest.raises(ValueError, match=r":3: expected"):
        parse_forecast("time,g\n2026-01-01T00:00:00Z,1\nyesterday,5\n")
    with pytest.raises(ValueError, match=">= 0"):
        parse_forecast("2026-01-01T00:00:00Z,-5\n")
    with pytest.raises(ValueError, match="no forecast rows"):
        parse_forecast("timestamp,gco2e_per_kwh\n")


def test_mean_is_time_weighted(forecast):
    assert forecast.mean(T0 + 11 * H, 2 * H) == pytest.approx((90 + 80) / 2)
    assert forecast.mean(T0 + 11 * H + 1800, H) == pytest.approx((90 + 80) / 2)
    assert forecast.mean(T0 + 12 * H, 0) == 80


def test_the_mean_of_a_short_run_inside_one_hour_is_that_hours_value(forecast):
    """A run of milliseconds at a unix-time start: the float error of start + seconds - start
    must not leak into the mean (it made a constant 500 come out as 500.002)."""
    start = forecast.times[5] + 0.37
    for seconds in (0.0213, 0.001, 1.5, 1000.0):
        assert forecast.mean(start, seconds) == forecast.at(start)


def test_picks_the_cleanest_hours_in_the_window(forecast):
    assert choose_start(forecast, T0, H, T0 + 24 * H) == T0 + 12 * H  # the single cleanest hour
    # three hours of work: 11-14 (mean 85) beats 12-15 (101.7) and 10-13 (106.7)
    assert choose_start(forecast, T0, 3 * H, T0 + 24 * H) == T0 + 11 * H
    # a window ending at 11:00 leaves the dip out: the cleanest hour before it is 10:00
    assert choose_start(forecast, T0, H, T0 + 11 * H) == T0 + 10 * H


def test_a_deadline_the_clean_hours_cannot_meet_runs_at_once(forecast):
    now = T0 + 30  # 00:00:30, mid-hour
    assert choose_start(forecast, now, H, now + H) == now  # no later hour leaves room for the run
    assert choose_start(forecast, now, 30 * H, now + 24 * H) == now  # the run outlasts the window
    assert choose_start(None, now, H, now + 24 * H) == now  # no forecast


def test_clean_now_runs_at_once():
    f = parse_forecast(f"{T0},50\n{T0 + H},500\n{T0 + 2 * H},50\n")
    assert choose_start(f, T0 + 600, 600, T0 + 24 * H) == T0 + 600
    equal = parse_forecast(f"{T0},100\n{T0 + H},100\n")
    assert choose_start(equal, T0 + 600, 600, T0 + 24 * H) == T0 + 600  # a tie: never wait for nothing


def test_plan_reports_the_saving(forecast):
    tokens, tps, jpt = 36_000, 10.0, 0.5  # one hour of work, 18 kJ
    plan = plan_batch(forecast, T0, T0 + 24 * H, tokens, tps, jpt, "measured", pue=1.5)
    assert plan.scheduled_start_at == T0 + 12 * H and plan.estimated_run_seconds == pytest.approx(H)
    assert plan.intensity_at_once == 420 and plan.intensity_scheduled == 80
    kwh = tokens * jpt * 1.5 / 3.6e6
    assert plan.estimated_carbon_grams_saved == pytest.approx(kwh * (420 - 80))
    d = plan.as_dict()
    assert d["scheduled_start_at"] == T0 + 12 * H and d["joules_per_token_source"] == "measured"
    assert math.isclose(d["estimated_carbon_grams_saved"], kwh * 340, rel_tol=1e-5)
    at_once = plan_batch(None, T0 + 5, T0 + 24 * H, tokens, tps, jpt, "default").as_dict()
    assert at_once["scheduled_start_at"] == T0 + 5 and at_once["estimated_carbon_grams_saved"] is None
    nothing = plan_batch(forecast, T0, T0 + 24 * H, 0, tps, jpt, "default")  # only bad lines
    assert nothing.scheduled_start_at == T0


def test_completion_windows():
    assert window_seconds("24h") == 24 * H and window_seconds("1h") == H
    for bad in ("0h", "24", "1d", "169h", "-1h", " 24h"):
        with pytest.raises(ValueError, match="completion_window"):
            window_seconds(bad)


def test_token_estimate_counts_output_and_prompt():
    chat = '{"messages": [{"role": "user", "content": "' + "x" * 400 + '"}], "max_tokens": 32, "n": 2}'
    assert 2 * 32 + 100 <= estimated_tokens(chat) <= 2 * 32 + 130
    assert estimated_tokens('{"prompt": "hi"}') >= 256  # no max_tokens: a default


def test_a_bad_forecast_fails_at_startup(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,g\nnot a time,1\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        JobsConfig(data_dir=str(tmp_path), carbon_forecast=str(path))


def test_scheduled_start_survives_reopening_the_store(tmp_path):
    store = JobStore(tmp_path)
    temp = store.new_temp_path()
    temp.write_text("{}\n")
    source = store.add_file(temp, "in.jsonl", "batch")
    batch_id = store.create_batch(source["id"], "/v1/chat/completions", "24h")["id"]
    plan = {"scheduled_start_at": T0 + 12 * H, "estimated_carbon_grams_saved": 1.5}
    store.start_batch(batch_id, [InputLine(1, "a", body="{}")], lambda: plan)
    store.close()
    store = JobStore(tmp_path)
    row = store.batch(batch_id)
    assert row["status"] == "in_progress" and row["scheduled_start_at"] == T0 + 12 * H
    assert row["plan"] is not None and '"estimated_carbon_grams_saved": 1.5' in row["plan"]
    store.close()


def test_an_old_database_gets_the_new_columns(tmp_path):
    import sqlite3

    from leanserve.jobs.store import SCHEMA

    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(SCHEMA)  # as the first release made it
    db.execute("INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, created_at) "
               "VALUES ('batch_old', 'file-x', '/v1/chat/completions', '24h', 'completed', 1)")
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    row = store.batch("batch_old")
    assert row["scheduled_start_at"] is None and row["plan"] is None
    store.close()
    JobStore(tmp_path).close()  # and opening it again adds nothing twice
