"""Work that outlives one HTTP request: uploaded files, Batch API batches, async requests.

Everything lives in a `JobStore` (SQLite plus a folder of file bytes) under one data
directory, so a server killed in the middle picks its work up again when restarted on the
same directory. A `JobWorker` runs the stored work through the same engine as live
traffic, in a less urgent service class (engine.sequence.PRIORITY_CLASSES): async
requests are `standard`, Batch API lines `batch`; live calls are `realtime`.
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass
class JobsConfig:
    data_dir: str = "./leanserve-data"
    max_batch_concurrency: int = 8  # batch lines in the engine at once, over all batches
    max_async_concurrency: int = 8  # async requests in the engine at once
    max_file_bytes: int = 100 * 1024 * 1024  # larger uploads get 413
    # Carbon-aware deferral: an hourly `timestamp,gco2e_per_kwh` CSV; a batch starts in the
    # cleanest hours that still meet its completion window (jobs.carbon_schedule). Read again
    # for each new batch, so the file can be updated in place. None: batches start at once.
    carbon_forecast: str | None = None
    # How long a batch runs and what energy it uses come from this server's own step times
    # and energy bill once it has run some tokens; before that, from these two figures.
    default_tokens_per_second: float = 100.0  # prompt + output tokens per second of engine time
    default_joules_per_token: float = 0.2  # IT energy per token (the built-in model on a 2-core CPU)
    # Vector stores: None -> SQLite at <data_dir>/vectors.sqlite3; a path (or sqlite://path)
    # -> SQLite there; postgresql://... -> Postgres with pgvector (rag/pgvector.py)
    vector_store: str | None = None

    def __post_init__(self):
        for name in ("max_batch_concurrency", "max_async_concurrency", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("default_tokens_per_second", "default_joules_per_token"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.carbon_forecast is not None:
            from .carbon_schedule import load_forecast

            try:  # a bad file fails at startup, not at the first batch
                load_forecast(self.carbon_forecast)
            except OSError as e:
                raise ValueError(f"cannot read the carbon forecast: {e}") from None
