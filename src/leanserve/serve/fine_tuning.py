"""The fine-tuning API (`/v1/fine_tuning/jobs`), as the `openai` client's `fine_tuning` resource uses it.

A job trains a LoRA adapter on a `fine-tune` file (tune/): created `validating_files`, then
`queued`, `running`, and `succeeded` (the adapter registered and served at once as
`ft:<base>:<suffix>:<job id>`), `failed` or `cancelled`; `paused` between pause and resume.
A file with bad lines is refused at creation with a 400 naming them. Extension fields:
`leanserve.bill` (the training's joules, grams CO2e and cost) and, for memory tuning,
`leanserve.recall` (per-fact recall).
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..tune.data import FileError, parse_jsonl
from ..tune.jobs import FineTuning, TuneSettings
from ..tune.trainer import MAX_BATCH, MAX_EPOCHS, MAX_MULTIPLIER
from . import openapi, protocol as p
from .protocol import APIError

SUFFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Auto, int] = Field("auto")
    batch_size: Union[Auto, int] = Field("auto")
    learning_rate_multiplier: Union[Auto, float] = Field("auto")


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "memory"]
    supervised: MethodParams | None = None
    memory: MethodParams | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list | None = None


def _hyper_check(h: Hyperparameters) -> dict:
    out = h.model_dump()
    for name, top in (("n_epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH), ("learning_rate_multiplier", MAX_MULTIPLIER)):
        v = out[name]
        if v != "auto" and not (0 < v <= top):
            raise APIError(400, f"Invalid hyperparameter {name}: {v}; expected 'auto' or a number in (0, {top}]",
                           param=f"hyperparameters.{name}", code="invalid_hyperparameters")
    return out


def job_object(row: dict) -> dict:
    method = json.loads(row["method"])
    hyper = json.loads(row["hyperparameters"])
    kind = method["type"]
    bill = json.loads(row["bill"]) if row.get("bill") else None
    extension = {"bill": bill, "requested": row.get("requested")}
    if row.get("report"):
        extension["recall"] = json.loads(row["report"])
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "fine_tuned_model": row["fine_tuned_model"], "organization_id": "leanserve",
        "result_files": json.loads(row["result_files"]), "status": row["status"],
        "validation_file": row["validation_file"], "training_file": row["training_file"],
        "hyperparameters": hyper, "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "user_provided_suffix": row["suffix"],
        "seed": row["seed"], "estimated_finish": row["estimated_finish"], "integrations": [],
        "method": {"type": kind, kind: {"hyperparameters": hyper}},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "leanserve": extension,
    }


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"], "level": row["level"],
            "message": row["message"], "type": row["type"], "data": json.loads(row["data"]) if row["data"] else {}}


def checkpoint_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": row["fine_tuned_model_checkpoint"], "fine_tuning_job_id": row["job_id"],
            "metrics": json.loads(row["metrics"]), "step_number": row["step_number"]}


def _page(rows: list[dict], limit: int, shape) -> dict:
    data = [shape(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _limit(value: int) -> int:
    if not 1 <= value <= 1000:
        raise APIError(400, f"Invalid 'limit': {value}; expected 1 to 1000", param="limit")
    return value


def fine_tuning_router(server, jobs_config, settings: TuneSettings | None = None) -> APIRouter:
    settings = settings or TuneSettings(base_model=server.engine.config.model, base_name=server.model_name)
    settings.base_name = server.model_name
    tuning = FineTuning(jobs_config.data_dir, settings, server.engine, server.job_store)
    server.fine_tuning = tuning
    tuning.start()

    def ok(body: dict) -> JSONResponse:
        server.metrics.count(200)
        return JSONResponse(body)

    def job_row(job_id: str) -> dict:
        row = tuning.db.job(job_id)
        if row is None:
            raise APIError(404, f"No fine-tuning job found with id {job_id!r}", param="fine_tuning_job_id",
                           code="fine_tuning_job_not_found")
        return row

    def check_file(file_id: str | None, param: str) -> bytes | None:
        if file_id is None:
            return None
        row = server.job_store.file(file_id)
        if row is None:
            raise APIError(400, f"Invalid file id {file_id!r}: no such file", param=param, code="invalid_file_id")
        if row["purpose"] != "fine-tune":
            raise APIError(400, f"File {file_id} has purpose {row['purpose']!r}; fine-tuning files must be uploaded "
                           "with purpose 'fine-tune'", param=param, code="invalid_file_purpose")
        data = server.job_store.file_path(file_id).read_bytes()
        try:
            parse_jsonl(data)
        except FileError as e:
            raise APIError(400, f"{param} {file_id}: {e.message}", param=param, code="invalid_file_format") from None
        return data

    async def create(request: Request) -> JSONResponse:
        req = p.parse_body(CreateJob, await server._body(request))
        if req.model != server.model_name:
            raise APIError(400, f"Model {req.model!r} is not available for fine-tuning; this server trains "
                           f"{server.model_name!r}", param="model", code="model_not_available")
        if server.engine.engine.args.num_experts:
            raise APIError(400, "This server's model is a mixture of experts, which cannot be fine-tuned here",
                           param="model", code="model_not_available")
        if req.suffix is not None and not SUFFIX_RE.fullmatch(req.suffix):
            raise APIError(400, "Invalid 'suffix': up to 64 letters, digits, '.', '_' or '-'", param="suffix")
        if req.integrations:
            raise APIError(400, "Integrations are not supported by this server", param="integrations")
        method = req.method or Method(type="supervised", supervised=MethodParams(hyperparameters=req.hyperparameters))
        params = getattr(method, method.type) or MethodParams()
        hyper = params.hyperparameters or req.hyperparameters or Hyperparameters()
        given = {k: v for k, v in _hyper_check(hyper).items() if v != "auto"}
        await asyncio.to_thread(check_file, req.training_file, "training_file")
        await asyncio.to_thread(check_file, req.validation_file, "validation_file")
        shown = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", **given}
        row = tuning.db.add_job(model=req.model, training_file=req.training_file, validation_file=req.validation_file,
                                suffix=req.suffix, seed=req.seed if req.seed is not None else 42,
                                method=json.dumps({"type": method.type}), hyperparameters=json.dumps(shown),
                                metadata=json.dumps(req.metadata) if req.metadata else None)
        tuning.db.event(row["id"], f"Validating training file: {req.training_file}")
        tuning.kick()
        return ok(job_object(row))

    async def list_jobs(after: str | None = None, limit: int = 20) -> JSONResponse:
        return ok(_page(tuning.db.page("jobs", after, _limit(limit)), limit, job_object))

    async def retrieve(job_id: str) -> JSONResponse:
        return ok(job_object(job_row(job_id)))

    def action(what: str):
        async def handler(job_id: str) -> JSONResponse:
            row = job_row(job_id)
            status = row["status"]
            allowed = {"cancel": ("validating_files", "queued", "running", "paused"),
                       "pause": ("validating_files", "queued", "running"), "resume": ("paused",)}[what]
            if status not in allowed:
                raise APIError(400, f"Cannot {what} a job that is {status}", param="fine_tuning_job_id",
                               code="invalid_job_status")
            return ok(job_object(tuning.request(job_id, what)))
        return handler

    async def events(job_id: str, after: str | None = None, limit: int = 20) -> JSONResponse:
        job_row(job_id)
        return ok(_page(tuning.db.page("events", after, _limit(limit), job_id), limit, event_object))

    async def checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> JSONResponse:
        job_row(job_id)
        return ok(_page(tuning.db.page("checkpoints", after, _limit(limit), job_id), limit, checkpoint_object))

    router = APIRouter(prefix="/v1/fine_tuning", dependencies=[Depends(server.authorize)])
    router.post("/jobs", **openapi.spec(CreateJob, *openapi.JSON_BODY))(create)
    router.get("/jobs", **openapi.spec(None))(list_jobs)
    router.get("/jobs/{job_id}", **openapi.spec(None, 404))(retrieve)
    for what in ("cancel", "pause", "resume"):
        router.post(f"/jobs/{{job_id}}/{what}", **openapi.spec(None, 400, 404))(action(what))
    router.get("/jobs/{job_id}/events", **openapi.spec(None, 404))(events)
    router.get("/jobs/{job_id}/checkpoints", **openapi.spec(None, 404))(checkpoints)
    return router
