"""`retro serve`: a trained RETRO on Ray Serve, reading the platform's live neighbour pool.

Two deployments composed with a ``DeploymentHandle`` (``build_app``):

- ``Generator`` (the FastAPI ingress: the HTTP API of ``api.py`` and the page at ``/``; autoscaled, ``serve.min_replicas``..``serve.max_replicas``, target
  ``serve.target_ongoing_requests``): the model (a checkpoint directory or an MLflow model URI), the
  database's tokenizer and encoder, and a client of the neighbour pool (the same shard actors,
  attached by name, and the same code path as training and `retro generate`). Concurrent requests are
  stepped together in one forward pass per token (``engine.Engine``), one pool query per step for
  every chunk that completed; same-document exclusion is off (free text has no document). A streamed
  completion sends the tokens generated within ``serve.stream_interval_ms`` as one server-sent event.
- ``Documents`` (one replica): ``POST /v1/documents`` runs the `retro add-docs` stage on the posted
  documents (same validation), so they are durable in the database; every generator replica sees the
  new shard at its next request (it compares the manifest's revision and attaches the new actors).

Errors a request can cause are 4xx with ``{"error": "<field>: <what to change>"}``; nothing a request
sends ends a replica.
"""

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.serve.api import (
    CompletionRequest,
    DocumentsRequest,
    RequestError,
    check_limits,
    parse_body,
)

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "page.html"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


# ---- the model ---------------------------------------------------------------------------------------
def is_mlflow_uri(source: str | None) -> bool:
    """Whether ``source`` names an MLflow model rather than a checkpoint directory."""
    return bool(source) and source.startswith(MLFLOW_SCHEMES)


def model_directory(config: PlatformConfig, source: str | None) -> Path:
    """A local directory holding ``model.safetensors`` for ``source``: an MLflow model URI (its
    artifacts downloaded from the tracking server), a checkpoint directory, or None (the newest
    checkpoint of ``train.name``)."""
    from retro_model.checkpoint import WEIGHTS_FILE
    from retro_platform.checkpoints import resolve_checkpoint
    from retro_platform.errors import CheckpointError

    if not is_mlflow_uri(source):
        return resolve_checkpoint(config, source)
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
    except Exception as exc:  # MLflow raises several types for a missing model or version
        raise CheckpointError(f"cannot load MLflow model {source}: {str(exc).splitlines()[0]}") from None
    found = sorted(local.rglob(WEIGHTS_FILE))
    if not found:
        raise CheckpointError(f"MLflow model {source} holds no {WEIGHTS_FILE}: not logged by retro train")
    return found[0].parent


def load_served_model(config: PlatformConfig, source: str | None, manifest):
    """(model in eval mode, checkpoint metadata, where it came from); refuses a model the database's
    tokenizer, chunk length or vocabulary does not match (``checkpoints.check_compatible``)."""
    from retro_platform.checkpoints import load_compatible_model

    directory = model_directory(config, source)
    model, extra = load_compatible_model(config, directory, manifest)
    return model.eval(), extra, source or str(directory)


def check_service(config: PlatformConfig, source: str | None) -> dict[str, Any]:
    """Everything the replicas would refuse, checked in the driver before any replica starts -> the
    model's config and metadata."""
    from retro_platform.db.manifest import validate_database

    manifest = validate_database(config.db_path)
    model, extra, label = load_served_model(config, source, manifest)
    return {
        "model": label,
        "db_id": manifest.db_id,
        "retrieval": model.config.retrieval,
        "step": extra.get("step"),
    }


async def drain(events: asyncio.Queue) -> list[dict]:
    """The next event of a queue and every other one already waiting in it."""
    out = [await events.get()]
    while not events.empty():
        out.append(events.get_nowait())
    return out


def is_final(event: dict) -> bool:
    """Whether an event ends its completion."""
    return "done" in event or "error" in event


api = FastAPI(title="RETRO", docs_url="/docs", redoc_url=None)


def error_response(status: int, message: str) -> JSONResponse:
    """A one-line JSON error."""
    return JSONResponse({"error": message}, status_code=status)


def sse(event: dict) -> str:
    """One server-sent event line."""
    return f"data: {json.dumps(event)}\n\n"


# ---- deployments -------------------------------------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=4, health_check_period_s=5)
class Documents:
    """Adds posted documents to the database with the `retro add-docs` stage, one request at a time."""

    def __init__(self, config: dict):
        self.config = PlatformConfig.from_dict(config)
        self.uploads = storage.join(self.config.work_dir, "serve-uploads")  # local or s3://, like work_dir
        self._lock = asyncio.Lock()

    def _add(self, documents: list[dict]) -> dict:
        from retro_platform.db.add_docs import add_documents
        from retro_platform.errors import RetroError

        path = storage.join(self.uploads, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl")
        lines = "".join(json.dumps({k: v for k, v in d.items() if v is not None}) + "\n" for d in documents)
        storage.write_bytes_atomic(path, lines.encode())
        try:
            manifest = add_documents(self.config, [path])
        except RetroError as exc:
            return {"error": f"documents: {str(exc).splitlines()[0]}", "status": 422}
        finally:
            storage.delete(path)
        return {
            "added": len(documents),
            "ids": [d["id"] for d in documents],
            "revision": manifest.revision,
            "db_id": manifest.db_id,
            "chunks": sum(manifest.counts.chunks.values()),
        }

    async def add(self, documents: list[dict]) -> dict:
        """Add documents (validated by the stage like `retro add-docs` input) -> what changed."""
        async with self._lock:
            return await asyncio.to_thread(self._add, documents)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=5, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class Generator:
    """The HTTP API and page, the model, the tokenizer, the encoder and a pool client; completions
    batched per step. Being the ingress itself, a streamed token crosses one process (this replica) on
    its way to the HTTP proxy, not two."""

    def __init__(self, config: dict, source: str | None, documents: DeploymentHandle):
        from retro_platform.db.store import ChunkStore
        from retro_platform.db.tokenizer import load_tokenizer_file
        from retro_platform.neighbors.pool import NeighborPool
        from retro_platform.serve.engine import Engine

        self.config = PlatformConfig.from_dict(config)
        serve_cfg = self.config.serve
        # Every torch call of the replica (loading, the encoder, every generation step) runs on this one
        # thread: two threads with OpenMP teams of their own contend for the cores (a generation step of
        # the demo model took 5.5 ms instead of 1.9 with the steps on another thread than the loading).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retro-torch")
        self.torch_thread.submit(self._load, source, serve_cfg.cpus_per_replica).result()
        self.store = ChunkStore(self.config.db_path, self.manifest)
        self.tokenizer = load_tokenizer_file(self.store.layout.tokenizer)
        self.pad = self.manifest.tokenizer.pad_id
        self.k = self.model.config.num_neighbors
        self.align = self.model.config.neighbor_alignment == "match"
        self.pool = None
        if self.model.config.retrieval:
            self.pool = NeighborPool.start(self.config, self.manifest)
        self._refresh_lock = threading.Lock()
        self.engine = Engine(
            self.model,
            self.tokenizer,
            self.lookup if self.pool is not None else None,
            serve_cfg.max_batch_size,
            eos_id=self.tokenizer.token_to_id("<eod>"),
            executor=self.torch_thread,
        )
        self.documents = documents
        self.limits = {
            "max_tokens": serve_cfg.max_tokens,
            "max_prompt_chars": serve_cfg.max_prompt_chars,
            "max_body_bytes": serve_cfg.max_body_bytes,
        }
        self.stream_interval_s = serve_cfg.stream_interval_ms / 1000
        self.replica = os.getpid()
        logger.info("generator replica %d: %s on %s", self.replica, self.source, self.device)

    def _load(self, source: str | None, cpus: float) -> None:
        """Load the model and the encoder (on the torch thread)."""
        from retro_platform.db.embed import Embedder
        from retro_platform.db.manifest import validate_database

        torch.set_num_threads(max(1, math.ceil(cpus)))
        self.manifest = validate_database(self.config.db_path)
        self.model, self.extra, self.source = load_served_model(self.config, source, self.manifest)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.embedder = Embedder.from_manifest(self.manifest, out_dtype="float32")

    # -- retrieval ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Attach the shards `add-docs` added since this replica last looked (a manifest revision)."""
        from retro_platform.db.manifest import load_manifest
        from retro_platform.db.store import ChunkStore

        manifest = load_manifest(self.config.db_path)
        if manifest.revision == self.manifest.revision and manifest.db_id == self.manifest.db_id:
            return
        with self._refresh_lock:
            if self.pool is not None:
                self.pool.refresh(self.config, manifest)
            self.store = ChunkStore(self.config.db_path, manifest)
            self.manifest = manifest

    def search(self, texts: list[str], chunk_tokens: list[list[int]] | None, k: int):
        """The pool's neighbours of texts (embedded as the database's chunks were) -> Neighbors."""
        vectors = self.embedder.encode(texts).astype(np.float32)
        query_tokens = None
        if chunk_tokens is not None:
            query_tokens = np.asarray(chunk_tokens, dtype=np.int32)
        return self.pool.search(vectors, k=k, query_tokens=query_tokens)

    def describe(self, found, row: int) -> list[dict[str, Any]]:
        """The neighbours of query ``row`` as JSON: chunk id, document id, score, and the text read."""
        out = []
        for j in range(found.chunk_ids.shape[1]):
            chunk_id = int(found.chunk_ids[row, j])
            if chunk_id < 0:
                continue
            window = [int(t) for t in found.tokens[row, j] if t != self.pad]
            out.append(
                {
                    "chunk_id": chunk_id,
                    "doc_id": int(found.doc_ids[row, j]),
                    "score": round(float(found.scores[row, j]), 4),
                    "text": self.tokenizer.decode(window),
                }
            )
        return out

    def lookup(self, chunks: list[torch.Tensor]):
        """The engine's retrieval: the neighbours of completed chunks, one pool query for all of them."""
        ids = [c.tolist() for c in chunks]
        found = self.search([self.tokenizer.decode(c) for c in ids], ids if self.align else None, self.k)
        return [
            (torch.from_numpy(found.tokens[i].astype(np.int64)), {"neighbors": self.describe(found, i)})
            for i in range(len(chunks))
        ]

    # -- requests -----------------------------------------------------------------------------------
    def _row(self, body: dict):
        from retro_platform.serve.engine import Row

        request = CompletionRequest.model_validate(body)
        prompt_ids = self.tokenizer.encode(request.prompt).ids
        limit = self.model.config.max_seq_len
        if not prompt_ids:
            raise RequestError(422, "prompt: encodes to no tokens")
        if len(prompt_ids) + request.max_tokens > limit:
            raise RequestError(
                422,
                f"max_tokens: the prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceed the model's max_seq_len of {limit}; shorten the prompt or lower max_tokens",
            )
        return Row(
            prompt_ids=prompt_ids,
            max_new_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
        )

    def _done(self, row, text: str | None = None) -> dict:
        """The last event of a completion: its text (``text`` when the caller decoded it already),
        every chunk's neighbours and the usage figures."""
        return {
            "done": True,
            "text": self.tokenizer.decode(row.new_ids) if text is None else text,
            "chunks": row.chunks,
            "usage": {
                "prompt_tokens": len(row.prompt_ids),
                "completion_tokens": len(row.new_ids),
                "first_token_s": row.first_token_s,
                "retrieval_s": row.retrieval_s,
                "retrieved_chunks": len(row.chunks),
                "total_s": time.perf_counter() - row.started,
            },
            "replica": self.replica,
        }

    async def _start(self, body: dict):
        """A validated request queued on the engine -> its row."""
        row = self._row(body)
        await asyncio.to_thread(self.refresh)
        self.engine.submit(row)
        return row

    async def stream(self, body: dict):
        """Events of one completion: {"token", "ids"} (every token generated within one stream
        interval, decoded here rather than on the torch thread), {"chunk"} per retrieving chunk, then
        {"done", "text", "chunks", "usage"}; a refused request yields one {"error", "status"}."""
        try:
            row = await self._start(body)
        except RequestError as exc:
            yield {"error": exc.message, "status": exc.status}
            return
        try:
            async for event in self._events(row):
                yield event
        finally:
            row.cancelled = True  # a no-op once done; else the client went away: free its batch row

    async def _events(self, row):
        """The events of a queued row for its client (see ``stream``)."""
        ids: list[int] = []
        text = ""
        last = 0.0
        while True:
            batch = await drain(row.events)
            wait = last + self.stream_interval_s - time.perf_counter()
            if wait > 0 and not any(is_final(e) for e in batch):
                await asyncio.sleep(wait)  # let more tokens arrive: fewer, larger events
                while not row.events.empty():
                    batch.append(row.events.get_nowait())
            last = time.perf_counter()
            pending: list[int] = []
            for event in batch + [{}]:
                if "ids" in event:
                    pending += event["ids"]
                    continue
                if pending or "done" in event:
                    ids += pending
                    # a character whose bytes are not all generated yet decodes as U+FFFD: hold it back
                    decoded = self.tokenizer.decode(ids)
                    current = decoded if "done" in event else decoded.rstrip("\ufffd")
                    delta = current[len(text) :] if current.startswith(text) else ""
                    if pending or delta:
                        yield {"token": delta, "ids": pending}
                    text += delta
                    pending = []
                if "done" in event:
                    yield self._done(row, text)  # text holds every id by now: no second decode
                    return
                if event:
                    yield event
                if "error" in event:
                    return

    async def complete(self, body: dict) -> dict:
        """One completion as a dict (the done event, or an error)."""
        try:
            row = await self._start(body)
        except RequestError as exc:
            return {"error": exc.message, "status": exc.status}
        try:
            while True:
                for event in await drain(row.events):
                    if "error" in event:
                        return event
                    if "done" in event:
                        return self._done(row)
        finally:
            row.cancelled = True  # a no-op once done; else the request was cancelled

    async def neighbors(self, text: str, k: int | None) -> dict:
        """The pool's neighbours of a text (its first chunk's tokens align the windows)."""
        if self.pool is None:
            return {"error": "text: the served model has no retrieval", "status": 422}
        await asyncio.to_thread(self.refresh)
        ids = self.tokenizer.encode(text).ids[: self.manifest.chunk_len]
        chunk = [ids + [self.pad] * (self.manifest.chunk_len - len(ids))] if self.align else None
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.torch_thread, self.search, [text], chunk, k or self.k)
        return {"text": text, "neighbors": self.describe(found, 0)}

    async def info(self) -> dict:
        """Model, database and engine figures of this replica."""
        await asyncio.to_thread(self.refresh)
        counts = self.manifest.counts
        return {
            "model": {
                "source": self.source,
                "step": self.extra.get("step"),
                "retrieval": self.model.config.retrieval,
                "parameters": self.model.num_parameters(),
                "neighbor_alignment": self.model.config.neighbor_alignment,
                "max_seq_len": self.model.config.max_seq_len,
                "device": str(self.device),
            },
            "database": {
                "path": str(self.config.db_path),
                "db_id": self.manifest.db_id,
                "revision": self.manifest.revision or 0,
                "documents": sum(counts.documents.values()),
                "chunks": sum(counts.chunks.values()),
                "index_shards": len(self.manifest.index.shards),
            },
            "replica": {
                "pid": self.replica,
                "actor": ray.get_runtime_context().get_actor_name(),
                "steps": self.engine.steps,
                "mean_batch": self.engine.batched_rows / max(1, self.engine.steps),
                "generating": len(self.engine.active),
                "cancelled": self.engine.cancelled_rows,
            },
        }

    # -- HTTP ---------------------------------------------------------------------------------------
    async def _body(self, request: Request, model):
        raw = await request.body()
        return parse_body(raw, model, self.limits["max_body_bytes"])

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """The page to try the model."""
        return HTMLResponse(PAGE.read_text())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness of the HTTP side."""
        return {"status": "ok"}

    @api.get("/v1/info")
    async def info_route(self) -> dict:
        """Model, database version and size, replicas (of the replica that answers)."""
        info = await self.info()
        info["limits"] = self.limits
        return info

    @api.get("/v1/neighbors")
    async def neighbors_route(self, request: Request):
        """The neighbours of ``?text=...`` (``&k=`` optional)."""
        unknown = sorted(set(request.query_params) - {"text", "k"})
        if unknown:
            return error_response(422, f"{unknown[0]}: unknown query parameter")
        text = request.query_params.get("text", "")
        if not text.strip():
            return error_response(422, "text: required and must not be empty")
        if len(text) > self.limits["max_prompt_chars"]:
            return error_response(
                422, f"text: over the limit of {self.limits['max_prompt_chars']} characters"
            )
        k = request.query_params.get("k")
        if k is not None and (not k.isdigit() or not 1 <= int(k) <= 64):
            return error_response(422, "k: must be an integer from 1 to 64")
        result = await self.neighbors(text, int(k) if k else None)
        if "error" in result:
            return error_response(result["status"], result["error"])
        return result

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """A completion, or with ``stream: true`` server-sent events of its tokens."""
        try:
            body = await self._body(request, CompletionRequest)
            check_limits(body, self.limits["max_tokens"], self.limits["max_prompt_chars"])
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        payload = body.model_dump()
        if not body.stream:
            result = await self.complete(payload)
            if "error" in result:
                return error_response(result.get("status", 500), result["error"])
            return result
        events = self.stream(payload)
        first = await events.__anext__()
        if "error" in first:
            return error_response(first.get("status", 500), first["error"])

        async def relay():
            yield sse(first)
            async for event in events:
                yield sse(event)

        return StreamingResponse(relay(), media_type="text/event-stream")

    @api.post("/v1/documents")
    async def add_documents(self, request: Request):
        """Add documents to the database; the next completion on any replica can read them."""
        try:
            body = await self._body(request, DocumentsRequest)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        ids = [d.id for d in body.documents]
        if len(set(ids)) != len(ids):
            return error_response(422, "documents: ids must be unique within a request")
        result = await self.documents.add.remote([d.model_dump() for d in body.documents])
        if "error" in result:
            return error_response(result.get("status", 500), result["error"])
        return result

    def check_health(self) -> None:
        """Ray Serve's health check: the replica is healthy while its model is loaded."""
        if self.model is None:
            raise RuntimeError("model not loaded")


def build_app(config: PlatformConfig, source: str | None = None):
    """The Ray Serve application of ``config`` serving ``source`` (see ``model_directory``)."""
    serve_cfg = config.serve
    values = config.to_dict()
    documents = Documents.options(ray_actor_options={"num_cpus": 0.1}).bind(values)
    generator = Generator.options(
        autoscaling_config={
            "min_replicas": serve_cfg.min_replicas,
            "initial_replicas": serve_cfg.min_replicas,
            "max_replicas": serve_cfg.max_replicas,
            "target_ongoing_requests": serve_cfg.target_ongoing_requests,
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        },
        ray_actor_options={
            "num_cpus": serve_cfg.cpus_per_replica,
            "num_gpus": serve_cfg.gpus_per_replica,
        },
    ).bind(values, source, documents)
    return generator


def app_builder(args: dict) -> Any:
    """Application builder for a Ray Serve config file (``serve deploy`` / ``serve run``): ``args`` are
    ``config`` (a preset name or YAML path), ``overrides`` (a list of ``key=value``) and ``model``."""
    from retro_platform.config import load_config

    config = load_config(args.get("config", "demo"), list(args.get("overrides", [])))
    return build_app(config, args.get("model") or config.serve.model)


def start_service(config: PlatformConfig, source: str | None = None, blocking: bool = False):
    """Start Ray Serve's HTTP proxy on ``serve.host``:``serve.port`` and deploy the application -> the
    URL it answers on. With ``blocking`` it serves until interrupted."""
    from retro_platform.ray_utils import init_ray

    source = source or config.serve.model
    check_service(config, source)
    init_ray(config)
    serve_cfg = config.serve
    serve.start(
        http_options={
            "host": serve_cfg.host,
            "port": serve_cfg.port,
            "request_timeout_s": serve_cfg.request_timeout_s,
        }
    )
    serve.run(
        build_app(config, source),
        name=serve_cfg.app_name,
        route_prefix=serve_cfg.route_prefix,
        blocking=False,
    )
    url = f"http://{serve_cfg.host}:{serve_cfg.port}{serve_cfg.route_prefix.rstrip('/')}"
    if blocking:
        print(f"serving {source or config.train.name} at {url}/ (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(serve_cfg.app_name)
    return url


def stop_service(config: PlatformConfig) -> None:
    """Delete the application (the pool's shard actors stay for training and other clients)."""
    serve.delete(config.serve.app_name)
