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

    def __post_init__(self):
        for name in ("max_batch_concurrency", "max_async_concurrency", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
