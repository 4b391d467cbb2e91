"""Admin API: manage API keys with an admin key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from imagegate.api.deps import AdminKey, Service
from imagegate.api.responses import JSON
from imagegate.errors import NotFound
from imagegate.store import keys as key_store
from imagegate.store.models import ApiKey

router = APIRouter(prefix="/admin", tags=["admin"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    is_admin: bool = False
    allowed_models: list[str] | None = None


def key_view(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "is_admin": key.is_admin,
        "allowed_models": key.allowed_models,
        "created_at": key.created_at.isoformat(),
        "revoked": key.revoked_at is not None,
    }


def ok(data: Any) -> Response:
    return JSON({"code": 200, "msg": "Success", "data": data})


@router.post("/keys")
async def create_key(body: KeyCreate, _admin: AdminKey, service: Service) -> Response:
    async with service.sessions.begin() as session:
        key, secret = await key_store.create_key(
            session, name=body.name, is_admin=body.is_admin, allowed_models=body.allowed_models
        )
    return ok({**key_view(key), "key": secret})


@router.get("/keys")
async def list_keys(_admin: AdminKey, service: Service) -> Response:
    async with service.sessions() as session:
        return ok([key_view(k) for k in await key_store.list_keys(session)])


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, _admin: AdminKey, service: Service) -> Response:
    async with service.sessions.begin() as session:
        if not await key_store.revoke_key(session, key_id=key_id):
            raise NotFound(f"No active key with id {key_id}.")
    service.forget_key(key_id)
    return ok({"id": key_id, "revoked": True})
