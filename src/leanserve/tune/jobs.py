"""Fine-tuning jobs: durable state in SQLite, training run in slices that yield to serving.

State lives in `<data_dir>/fine_tuning.sqlite3` (jobs, events, checkpoints) and files under
`<data_dir>/fine_tuning/<job id>/`: `state.pt` (factors, optimizer and step, written at an
optimizer-step boundary at least every CHECKPOINT_SECONDS and at each epoch's end),
`ckpt-<step>/` (a PEFT folder per epoch, the last KEEP_CHECKPOINTS kept), `adapter/` (the
result). A job found `running` when the store opens (the process was killed) resumes from
its `state.pt`: the steps after it are run again, the ones before it are not.

Sharing the CPU (the yield rule): a job runs as a background task on the engine's step
thread (`AsyncEngine.background`), one slice at a time (setup, or one micro-batch of at most
trainer.MICRO_TOKENS tokens forward and backward, ~1 s on 2 cores), and only when no
realtime or standard sequence is in the engine (`mode="background"`; batch-class sequences
share the thread with it, alternating step for slice), or only when the engine is empty
(`mode="idle"`). So a realtime request waits at most for the slice under way when it
arrives, and while it runs the job does not run at all. The step thread is the only thread
that runs torch's parallel kernels: one OpenMP pool (two pools on two cores made each
barrier sleep; see engine/engine.py AsyncEngine).

Each slice is one step of the energy ledger under the job's own id: the job's bill (joules,
grams CO2e, cost) is in the job object (`leanserve.bill`) and in its metrics events.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..energy.ledger import Bill, Work
from .data import Dataset, FileError, parse_jsonl

log = logging.getLogger("leanserve.tune")

CHECKPOINT_SECONDS = 15.0
KEEP_CHECKPOINTS = 3
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
MAX_TRAIN_LEN = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL,
    method TEXT NOT NULL, hyperparameters TEXT NOT NULL, status TEXT NOT NULL, fine_tuned_model TEXT,
    trained_tokens INTEGER, error TEXT, result_files TEXT NOT NULL DEFAULT '[]', finished_at INTEGER,
    estimated_finish INTEGER, bill TEXT, metadata TEXT, requested TEXT, report TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step_number INTEGER NOT NULL, metrics TEXT NOT NULL, fine_tuned_model_checkpoint TEXT NOT NULL, path TEXT);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class JobDB:
    """The three tables, one connection per call (any thread)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        with self._conn() as db:
            db.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def execute(self, sql: str, *args) -> None:
        with self._lock:
            db = self._conn()
            try:
                db.execute(sql, args)
            finally:
                db.close()

    def rows(self, sql: str, *args) -> list[dict]:
        db = self._conn()
        try:
            return [dict(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    def one(self, sql: str, *args) -> dict | None:
        rows = self.rows(sql, *args)
        return rows[0] if rows else None

    # -- jobs ---------------------------------------------------------------------------------

    def add_job(self, **row) -> dict:
        row.setdefault("id", new_id("ftjob-"))
        row.setdefault("created_at", int(time.time()))
        row.setdefault("status", "validating_files")
        cols = ", ".join(row)
        self.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", *row.values())
        return self.job(row["id"])

    def job(self, job_id: str) -> dict | None:
        return self.one("SELECT * FROM jobs WHERE id = ?", job_id)

    def update(self, job_id: str, **values) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE jobs SET {sets} WHERE id = ?", *values.values(), job_id)

    def page(self, table: str, after: str | None, limit: int, job_id: str | None = None) -> list[dict]:
        """Newest first, `limit + 1` rows (one more says there are more), after the cursor's row."""
        where, args = [], []
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if after:
            ref = self.one(f"SELECT seq FROM {table} WHERE id = ?", after)
            if ref is not None:
                where.append("seq < ?")
                args.append(ref["seq"])
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self.rows(sql + " ORDER BY seq DESC LIMIT ?", *args, limit + 1)

    def event(self, job_id: str, message: str, level: str = "info", type: str = "message",
              data: dict | None = None) -> None:
        self.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?,?,?,?,?,?,?)",
                     new_id("ftevent-"), job_id, int(time.time()), level, message, type,
                     json.dumps(data) if data is not None else None)


@dataclass
class TuneSettings:
    mode: str = "background"  # background: yields to realtime and standard requests | idle: only when empty
    base_model: str | None = None  # the engine's model spec (None: the built-in model)
    base_name: str = ""  # its served name
    # torch threads while a slice runs (0: the engine's). On a machine shared with other
    # processes, one thread was ~14x faster than two (OpenMP barriers sleeping): tests set 1.
    num_threads: int = int(os.environ.get("LEANSERVE_TUNE_THREADS", "0") or 0)


@dataclass
class JobRun:
    """One job's training, as slices. `__call__(engine)` is the engine's background task."""

    manager: "FineTuning"
    job: dict
    trainer: object = None
    base: object = None
    bill: Bill = field(default_factory=Bill)
    last_save: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    def may_run(self, engine) -> bool:
        if engine is None:
            return True
        if self.manager.settings.mode == "idle":
            return not engine.has_unfinished()
        return not any(seq.priority < 2 for seq in list(engine.seqs.values()))

    def __call__(self, engine) -> bool:
        if self.finished or not self.may_run(engine):
            return False
        ledger = engine.ledger if engine is not None else self.manager.ledger
        tag = f"ft-{self.job['id']}"
        threads, previous = self.manager.settings.num_threads, torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            if ledger is not None:
                with ledger.step([Work(tag, self._slice_tokens(), 0, False)]):
                    self._slice()
                self.bill += ledger.close(tag)
            else:
                self._slice()
        except Exception as e:  # a bug or a bad file found late: the job fails, the server runs on
            log.exception("fine-tuning job %s failed", self.job["id"])
            self.manager.fail(self.job["id"], "training_error", f"Training failed: {e}")
            self.finished = True
        finally:
            if threads:
                torch.set_num_threads(previous)
        return True

    def _slice_tokens(self) -> int:
        t = self.trainer
        if t is None or t._queue is None:
            return 1
        return sum(len(r.ids) for r in t._queue[0]) if t._queue else 1

    def _slice(self) -> None:
        m, job_id = self.manager, self.job["id"]
        requested = (m.db.job(job_id) or {}).get("requested")
        if requested in ("cancel", "pause"):
            if self.trainer is not None:  # mid-step too: factors and optimizer are at the last full step
                self.trainer.save_state(str(m.job_dir(job_id) / "state.pt"))
            m.stop(job_id, requested, self.trainer, self.bill)
            self.finished = True
            return
        if self.trainer is None:
            self.trainer = m.build_trainer(self.job)
            self.last_save = time.monotonic()
            return
        t = self.trainer
        metrics = t.run_slice()
        if metrics is None:
            return
        epoch_end = t.step % t.steps_per_epoch == 0
        if epoch_end and t.valid is not None:
            metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = t.evaluate(t.valid)
        metrics["trained_tokens"] = t.trained_tokens
        metrics.update({"energy_joules": self.bill.energy_joules, "carbon_grams": self.bill.carbon_grams,
                        "cost_usd": self.bill.cost_usd})
        m.step_done(self, metrics, epoch_end)
        if t.done:
            m.succeed(self)
            self.finished = True


class FineTuning:
    """The jobs of one data directory and the one that runs now (one at a time)."""

    def __init__(self, data_dir: str | Path, settings: TuneSettings, engine=None, files=None, ledger=None):
        self.root = Path(data_dir)
        (self.root / "fine_tuning").mkdir(parents=True, exist_ok=True)
        self.db = JobDB(self.root / "fine_tuning.sqlite3")
        self.settings, self.engine, self.files, self.ledger = settings, engine, files, ledger
        self.tokenizer = engine.tokenizer if engine is not None else None
        self.current: JobRun | None = None
        self._base = None  # the float32 base, kept between jobs
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def job_dir(self, job_id: str) -> Path:
        path = self.root / "fine_tuning" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Serves the adapters of finished jobs and starts the thread that runs the queue."""
        for row in self.db.rows("SELECT * FROM jobs WHERE status = 'succeeded'"):
            self._register(row["fine_tuned_model"], self.root / "fine_tuning" / row["id"] / "adapter")
        self._thread = threading.Thread(target=self._loop, name="leanserve-tune", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        run = self.current
        if run is not None and self.engine is not None and run in self.engine.background:
            self.engine.background.remove(run)

    def kick(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            row = self.db.one("SELECT * FROM jobs WHERE status IN ('validating_files', 'queued', 'running') "
                              "ORDER BY CASE status WHEN 'running' THEN 0 ELSE 1 END, seq LIMIT 1")
            if row is None:
                self._base = None  # no job waits: the float32 base goes (it is read again for the next)
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.run_job(row)

    def run_job(self, row: dict, engine_loop: bool = True) -> None:
        """Validates (if not yet), then trains to the end, a cancel or a pause. With an
        engine the slices run on its step thread; offline, on this thread."""
        if row["status"] == "validating_files":
            if not self.validate(row):
                return
            row = self.db.job(row["id"])
            if row["status"] != "validating_files":  # cancelled meanwhile
                return
            self.db.update(row["id"], status="queued")
            self.db.event(row["id"], "Files validated, job queued")
            row = self.db.job(row["id"])
        if (row.get("requested") or "") in ("cancel", "pause"):
            self.stop(row["id"], row["requested"], None, Bill())
            return
        if row["status"] == "queued":
            self.db.update(row["id"], status="running")
            self.db.event(row["id"], "Fine-tuning job started")
        run = JobRun(self, self.db.job(row["id"]))
        bill = json.loads(row["bill"]) if row.get("bill") else None
        if bill:
            run.bill = Bill(bill["energy_joules"], bill["carbon_grams"], bill["cost_usd"], energy_source=bill.get("energy_source", ""))
        self.current = run
        if self.engine is not None and engine_loop:
            self.engine.background.append(run)
            self.engine._wake.set()
            while not run.finished and not self._stop:
                time.sleep(0.2)
            if run in self.engine.background:
                self.engine.background.remove(run)
        else:
            while not run.finished and not self._stop:
                run(None)
        self.current = None

    # -- the stages ---------------------------------------------------------------------------

    def _read_file(self, file_id: str) -> bytes:
        return self.files.file_path(file_id).read_bytes()

    def validate(self, row: dict) -> bool:
        try:
            self.examples(row)
        except FileError as e:
            self.fail(row["id"], "invalid_training_file", e.message)
            return False
        return True

    def examples(self, row: dict):
        train = parse_jsonl(self._read_file(row["training_file"]))
        valid = parse_jsonl(self._read_file(row["validation_file"])) if row.get("validation_file") else None
        return train, valid

    def base(self):
        if self._base is None:
            from .lora import BaseModel

            self._base = BaseModel.load(self.settings.base_model, MAX_TRAIN_LEN)
        return self._base

    def build_trainer(self, row: dict):
        """On the step thread (its torch work is the engine's pool): base weights, data, trainer,
        and the last saved state when the job ran before."""
        from .memory import augment
        from .trainer import new_trainer

        base = self.base()
        method = json.loads(row["method"])
        train, valid = self.examples(row)
        given = json.loads(row["hyperparameters"])
        if method.get("type") == "memory":
            train, given = augment(train), {**{"n_epochs": "auto"}, **given, "memory": True}
        tok = base.tokenizer
        data = Dataset.of(tok, train, MAX_TRAIN_LEN)
        vdata = Dataset.of(tok, valid, MAX_TRAIN_LEN) if valid else None
        hyper = None
        if given.get("memory"):
            from .memory import memory_hyperparameters

            hyper = memory_hyperparameters(given, len(data.rows))
        trainer = new_trainer(base, data, given, row["seed"], vdata, hyper=hyper)
        state = self.job_dir(row["id"]) / "state.pt"
        self.db.update(row["id"], hyperparameters=json.dumps(trainer.hyper.as_dict()))
        if state.exists():
            trainer.load_state(str(state))
            self.db.event(row["id"], f"Resumed from step {trainer.step} of {trainer.total_steps}")
        else:
            self.db.event(row["id"], f"Training on {len(data.rows)} examples ({data.tokens} tokens), "
                          f"{trainer.total_steps} steps", data=trainer.hyper.as_dict())
        return trainer

    def step_done(self, run: JobRun, metrics: dict, epoch_end: bool) -> None:
        t, job_id = run.trainer, run.job["id"]
        shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        shown["total_steps"] = t.total_steps
        self.db.event(job_id, f"Step {t.step}/{t.total_steps}: training loss={metrics['train_loss']:.4f}",
                      type="metrics", data=shown)
        elapsed = time.monotonic() - run.started
        eta = int(time.time() + elapsed / max(1, t.step) * (t.total_steps - t.step)) if t.step else None
        self.db.update(job_id, trained_tokens=t.trained_tokens, estimated_finish=eta,
                       bill=json.dumps(_bill_json(run.bill)))
        if epoch_end or time.monotonic() - run.last_save > CHECKPOINT_SECONDS:
            t.save_state(str(self.job_dir(job_id) / "state.pt"))
            run.last_save = time.monotonic()
        if epoch_end:
            self._checkpoint(run, metrics)

    def _checkpoint(self, run: JobRun, metrics: dict) -> None:
        t, job_id = run.trainer, run.job["id"]
        path = self.job_dir(job_id) / f"ckpt-{t.step}"
        t.lora.save(str(path))
        keep = {"step": t.step, "train_loss": metrics["train_loss"],
                "train_mean_token_accuracy": metrics["train_mean_token_accuracy"]}
        for k in ("valid_loss", "valid_mean_token_accuracy"):
            if k in metrics:
                keep[k] = metrics[k]
                keep["full_" + k] = metrics[k]
        name = f"{self.model_name(run.job)}:ckpt-step-{t.step}"
        self.db.execute("INSERT INTO checkpoints (id, job_id, created_at, step_number, metrics, "
                        "fine_tuned_model_checkpoint, path) VALUES (?,?,?,?,?,?,?)", new_id("ftckpt_"), job_id,
                        int(time.time()), t.step, json.dumps(keep), name, str(path))
        old = self.db.rows("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC LIMIT -1 OFFSET ?",
                           job_id, KEEP_CHECKPOINTS)
        for row in old:
            shutil.rmtree(row["path"], ignore_errors=True)
            self.db.execute("DELETE FROM checkpoints WHERE seq = ?", row["seq"])

    def model_name(self, row: dict) -> str:
        return f"ft:{row['model']}:{row['suffix'] or ''}:{row['id']}"

    def succeed(self, run: JobRun) -> None:
        t, job_id = run.trainer, run.job["id"]
        out = self.job_dir(job_id) / "adapter"
        t.lora.save(str(out))
        name = self.model_name(run.job)
        report = None
        if json.loads(run.job["method"]).get("type") == "memory":
            from .memory import recall_report

            report = recall_report(t)
            self.db.event(job_id, f"Recall on the training facts: {report['recall']:.1%} "
                          f"({report['recalled']}/{report['facts']})", data=report)
        results = []
        if self.files is not None:
            results.append(self._metrics_file(job_id))
        self._register(name, out)
        self.db.update(job_id, status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                       trained_tokens=t.trained_tokens, result_files=json.dumps(results),
                       bill=json.dumps(_bill_json(run.bill)), report=json.dumps(report) if report else None,
                       estimated_finish=None)
        self.db.event(job_id, f"New fine-tuned model created: {name}", data=_bill_json(run.bill))
        self.db.event(job_id, "The job has successfully completed")

    def _metrics_file(self, job_id: str) -> str:
        """OpenAI's step_metrics.csv, uploaded as a file of purpose fine-tune-results."""
        rows = self.db.rows("SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", job_id)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
        for r in rows:
            d = json.loads(r["data"])
            w.writerow([d["step"], d["train_loss"], d["train_mean_token_accuracy"], d.get("valid_loss", ""),
                        d.get("valid_mean_token_accuracy", "")])
        temp = self.files.new_temp_path()
        temp.write_text(buf.getvalue())
        return self.files.add_file(temp, "step_metrics.csv", "fine-tune-results")["id"]

    def _register(self, name: str | None, path: Path) -> None:
        lora = getattr(self.engine, "lora", None) if self.engine is not None else None
        if lora is None or not name or name in lora.adapters or not path.is_dir():
            return
        try:
            lora.register(name, str(path), check_path=False)
        except Exception as e:  # the job's result stays on disk; the server still serves the rest
            log.warning("could not register %s: %s", name, e)

    def fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.db.update(job_id, status="failed", finished_at=int(time.time()), estimated_finish=None,
                       error=json.dumps({"code": code, "message": message, "param": param}))
        self.db.event(job_id, message, level="error")

    def stop(self, job_id: str, requested: str, trainer, bill: Bill) -> None:
        status = "cancelled" if requested == "cancel" else "paused"
        values = {"status": status, "requested": None, "estimated_finish": None, "bill": json.dumps(_bill_json(bill))}
        if status == "cancelled":
            values["finished_at"] = int(time.time())
        self.db.update(job_id, **values)
        self.db.event(job_id, "Job cancelled" if status == "cancelled" else
                      f"Job paused at step {trainer.step if trainer else 0}")

    # -- requests from the API ----------------------------------------------------------------

    def request(self, job_id: str, what: str) -> dict | None:
        """cancel | pause | resume; returns the job row after, None when unknown."""
        row = self.db.job(job_id)
        if row is None:
            return None
        if what == "resume":
            if row["status"] == "paused":
                self.db.update(job_id, status="queued", requested=None)
                self.db.event(job_id, "Job resumed")
                self.kick()
        elif row["status"] in ACTIVE or (row["status"] == "paused" and what == "cancel"):
            current = self.current
            if current is not None and current.job["id"] == job_id:
                self.db.update(job_id, requested=what)  # the next slice stops it
            elif row["status"] != "paused" or what == "cancel":
                self.stop(job_id, what, None, Bill())
        return self.db.job(job_id)


def _bill_json(bill: Bill) -> dict:
    return {"energy_joules": round(bill.energy_joules, 6), "carbon_grams": round(bill.carbon_grams, 9),
            "cost_usd": round(bill.cost_usd, 9), "energy_source": bill.energy_source}

