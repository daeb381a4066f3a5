"""Adapter routes: GET /v1/models (resident and stored adapters), GET /v1/models/{model},
POST /v1/adapters/load and /unload."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from adapters.serving.engine import BASE
from adapters.serving.http.middleware import APIError, api_error_of, require_bearer_token
from adapters.serving.http.routes.context import Server, ServerContext
from adapters.serving.http.schemas import (
    AdapterBody,
    AdapterLoaded,
    AdapterUnloaded,
    ModelCard,
    ModelList,
    error_responses,
)

router = APIRouter(dependencies=[Depends(require_bearer_token)])
OWNER = "adapterkit"


def _epoch(created_at: str | None, fallback: float) -> int:
    """Unix seconds of a manifest's ISO 8601 created_at; ``fallback`` when it is missing or unreadable."""
    try:
        return int(datetime.fromisoformat(str(created_at)).timestamp())
    except ValueError:
        return int(fallback)


def _created_of(server: ServerContext, ref: str, stored_at: dict[str, str | None]) -> int:
    """When the adapter ``ref`` was made: the store's record, else its resident manifest's, else the base's."""
    if ref in stored_at:
        return _epoch(stored_at[ref], server.engine.loaded_at)
    try:
        manifest = server.engine.adapter_of(ref).manifest  # resident: no file I/O
    except Exception:  # noqa: BLE001 - a listing never fails on one entry
        manifest = {}
    return _epoch(manifest.get("created_at"), server.engine.loaded_at)


def _stored_rows(engine) -> list[dict]:
    """The store's listing, or nothing when the store cannot be read (what is resident is still listed)."""
    try:
        return engine.store_of().list()
    except Exception:  # noqa: BLE001 - an unreadable store still lists what is resident
        return []


def _model_cards(server: ServerContext) -> list[ModelCard]:
    """ "base", the resident adapters (name@version when stored), then the store's other versions for this task.
    A standalone engine (``serve --model``) lists its one artifact only: it refuses base and other adapters."""
    engine = server.engine
    standalone = getattr(engine, "model_ref", None) is not None
    stored = [] if standalone else _stored_rows(engine)
    stored_at = {f"{row['name']}@{row['version']}": row.get("created_at") for row in stored}
    cards = (
        []
        if standalone
        else [
            ModelCard(
                id=BASE,
                created=int(engine.loaded_at),
                owned_by=OWNER,
                base=engine.base_name,
                task=engine.task,
                resident=True,
            )
        ]
    )
    for r in engine.resident():
        if r.get("name") and r.get("version"):
            ref = f"{r['name']}@{r['version']}"
        else:
            ref = r["refs"][0] if r["refs"] else r["key"]
        cards.append(
            ModelCard(
                id=ref,
                created=_created_of(server, ref, stored_at),
                owned_by=OWNER,
                resident=True,
                method=r["method"],
                mixable=r["mixable"],
                labels=r["labels"],
                refs=r["refs"],
                uses=r["uses"],
            )
        )
    resident_ids = {c.id for c in cards}
    for row in stored:
        ref = f"{row['name']}@{row['version']}"
        if row.get("task") not in (None, engine.task) or ref in resident_ids:
            continue
        cards.append(
            ModelCard(
                id=ref,
                created=_epoch(row.get("created_at"), engine.loaded_at),
                owned_by=OWNER,
                resident=False,
                method=row.get("method"),
                tags=row.get("tags"),
            )
        )
    return cards


@router.get("/v1/models", tags=["adapters"], response_model=ModelList, responses=error_responses(401, 500))
def models(server: Server):
    """List "base", the resident adapters (name@version when stored), then the store's other versions for this task."""
    return ModelList(data=_model_cards(server))


@router.get(
    "/v1/models/{model:path}",
    tags=["adapters"],
    response_model=ModelCard,
    responses=error_responses(400, 401, 404, 500),
)
def model_card(model: str, server: Server):
    """One model: "base", a listed id (name@version), or any reference to a stored adapter (name, name@tag),
    answered under the reference asked for; 404 when the store has no such adapter."""
    cards = _model_cards(server)
    found = next((c for c in cards if c.id == model), None)
    if found is not None:
        return found
    ref = server.check_adapter(model)
    key = server.engine.key_of(ref)  # cheap after check_adapter: the folder the reference points at now
    resident = any(r["key"] == key for r in server.engine.resident())
    return ModelCard(id=ref, created=_created_of(server, ref, {}), owned_by=OWNER, resident=resident)


@router.post(
    "/v1/adapters/load",
    tags=["adapters"],
    response_model=AdapterLoaded,
    responses=error_responses(400, 401, 404, 409, 413, 500),
)
async def load_adapter(body: AdapterBody, server: Server):
    """Load ``adapter`` into memory now (evicting the least recently used beyond capacity); 404 when unknown."""
    ref = server.check_adapter(body.adapter, "adapter")
    if ref == BASE:
        raise APIError(400, "'base' is always loaded", param="adapter")
    try:
        entry = await run_in_threadpool(server.engine.load, ref)
    except Exception as err:  # noqa: BLE001
        raise api_error_of(err, ref, "adapter") from None
    return AdapterLoaded(
        loaded=ref,
        key=entry.adapter.key,
        load_seconds=round(entry.load_seconds, 4),
        resident=len(server.engine.resident()),
    )


@router.post(
    "/v1/adapters/unload",
    tags=["adapters"],
    response_model=AdapterUnloaded,
    responses=error_responses(400, 401, 404, 413, 500),
)
async def unload_adapter(body: AdapterBody, server: Server):
    """Free ``adapter``'s memory; ``unloaded`` is false when it was not resident."""
    ref = server.check_adapter(body.adapter, "adapter")
    if ref == BASE:
        raise APIError(400, "'base' cannot be unloaded", param="adapter")
    unloaded = await run_in_threadpool(server.engine.unload, ref)
    return AdapterUnloaded(unloaded=unloaded, adapter=ref, resident=len(server.engine.resident()))
