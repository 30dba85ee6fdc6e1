"""Routes of /v1/adapters: the adapter store's admin API (admin role), and per-adapter health.

``{ref}`` is ``name``, ``name@version`` (a unique prefix of the sha256 will do)
or ``name@alias``, as in a request's ``model`` field.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from adapter_store import ALIAS_PATTERN, NAME_PATTERN
from serving.api.adapters.protocol import (
    LIST_PAGE_SIZE,
    MAX_LIST_PAGE_SIZE,
    AdapterList,
    AdapterView,
    AliasRequest,
    DeleteResult,
    HealthView,
    RegisterRequest,
    UnloadResult,
    VersionView,
)
from serving.api.adapters.serving import AdaptersServing
from serving.api.auth import AdminDep, PrincipalDep
from serving.api.errors import ADMIN_ERRORS, ErrorResponse, InvalidRequestError
from serving.config import TENANT_PATTERN

router = APIRouter(tags=["adapters"])


def adapters_serving(request: Request) -> AdaptersServing:
    """Built with the engine by :mod:`serving.api.app`, which holds it on ``app.state``."""
    return request.app.state.adapters_serving


AdaptersServingDep = Annotated[AdaptersServing, Depends(adapters_serving)]

REF_PATTERN = NAME_PATTERN.removesuffix("$") + r"(@[A-Za-z0-9._-]{1,64})?$"
Name = Annotated[str, Path(pattern=NAME_PATTERN, description="Adapter name.")]
Ref = Annotated[str, Path(pattern=REF_PATTERN, description="name, name@version or name@alias.")]
Alias = Annotated[
    str, Path(pattern=ALIAS_PATTERN, description="Alias to set (not 'latest', which follows new versions).")
]


@router.get("/v1/adapters", response_model=AdapterList, responses=ADMIN_ERRORS)
async def list_adapters(
    serving: AdaptersServingDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_PAGE_SIZE, description="Adapters per page.")] = LIST_PAGE_SIZE,
    after: Annotated[str | None, Query(pattern=NAME_PATTERN, description="The previous page's last_id.")] = None,
) -> AdapterList:
    """A page of adapters (name order) with their versions, aliases, pins and health, and the cache tiers' state.

    Paged because a store holds thousands of adapters, each a few registry reads."""
    return await serving.list_adapters(limit=limit, after=after)


@router.post("/v1/adapters", response_model=VersionView, status_code=status.HTTP_201_CREATED, responses=ADMIN_ERRORS)
async def register_adapter(request: RegisterRequest, serving: AdaptersServingDep, _: AdminDep) -> VersionView:
    """Fetch, validate and register a version from a configured source, then health-check it."""
    return await serving.register(request)


MAX_UPLOAD_FILES = 8
MAX_UPLOAD_FIELDS = 32
MAX_UPLOAD_FIELD_BYTES = 64 << 10


class UploadFields(BaseModel):
    """The upload's form fields besides ``files``; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN, description="Owning tenant; null: public.")
    aliases: list[str] = Field(default=[], max_length=16, description="Aliases to point at the new version.")
    check: bool = Field(default=True, description="Load it and generate a few tokens before answering.")


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "maxItems": MAX_UPLOAD_FILES,
                        "description": "adapter_config.json and adapter_model.safetensors.",
                    },
                    **UploadFields.model_json_schema()["properties"],
                },
            }
        }
    },
}


@router.post(
    "/v1/adapters/{name}/versions",
    response_model=VersionView,
    status_code=status.HTTP_201_CREATED,
    responses=ADMIN_ERRORS | {429: {"model": ErrorResponse}},
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_adapter(name: Name, request: Request, serving: AdaptersServingDep, principal: AdminDep) -> VersionView:
    """Upload a version's files (multipart, at most limits.max_upload_bytes) and register it.

    The body is read only here, after the caller's role and upload rate are
    checked; it streams through the body limit, and each file is copied to
    the store's staging directory with the same byte cap.
    """
    serving.admit_upload(principal, request.client.host if request.client else "-")
    limits = {"max_files": MAX_UPLOAD_FILES, "max_fields": MAX_UPLOAD_FIELDS, "max_part_size": MAX_UPLOAD_FIELD_BYTES}
    async with request.form(**limits) as form:
        present = [key for key in UploadFields.model_fields if key in form]
        try:
            fields = UploadFields.model_validate({k: form.getlist(k) if k == "aliases" else form[k] for k in present})
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e
        parts = form.getlist("files")
        files = [f for f in parts if isinstance(f, UploadFile)]
        if len(files) != len(parts):
            raise InvalidRequestError("Each files part must be a file (with a filename).", param="files")
        return await serving.upload(name, files, tenant=fields.tenant, aliases=fields.aliases, check=fields.check)


@router.get("/v1/adapters/{name}", response_model=AdapterView, responses=ADMIN_ERRORS)
async def show_adapter(name: Name, serving: AdaptersServingDep, _: AdminDep) -> AdapterView:
    return await serving.show(name)


@router.put("/v1/adapters/{name}/aliases/{alias}", response_model=VersionView, responses=ADMIN_ERRORS)
async def set_alias(
    name: Name, alias: Alias, request: AliasRequest, serving: AdaptersServingDep, _: AdminDep
) -> VersionView:
    return await serving.set_alias(name, alias, request)


@router.put("/v1/adapters/{ref}/pin", response_model=VersionView, responses=ADMIN_ERRORS)
async def pin_adapter(ref: Ref, serving: AdaptersServingDep, _: AdminDep) -> VersionView:
    """Keep the version on disk (never evicted) and load it into the engine now."""
    return await serving.pin(ref, True)


@router.delete("/v1/adapters/{ref}/pin", response_model=VersionView, responses=ADMIN_ERRORS)
async def unpin_adapter(ref: Ref, serving: AdaptersServingDep, _: AdminDep) -> VersionView:
    return await serving.pin(ref, False)


@router.post("/v1/adapters/{ref}/unload", response_model=UnloadResult, responses=ADMIN_ERRORS)
async def unload_adapter(ref: Ref, serving: AdaptersServingDep, _: AdminDep) -> UnloadResult:
    """Drop the version from the engine's caches; the next request naming it loads it again."""
    return await serving.unload(ref)


@router.delete("/v1/adapters/{ref}", response_model=DeleteResult, responses=ADMIN_ERRORS)
async def delete_adapter(ref: Ref, serving: AdaptersServingDep, _: AdminDep) -> DeleteResult:
    """Delete a version; refused (409) while pinned, aliased or serving requests."""
    return await serving.delete(ref)


@router.get("/v1/adapters/{ref}/health", response_model=HealthView, responses=ADMIN_ERRORS)
async def adapter_health(ref: Ref, serving: AdaptersServingDep, principal: PrincipalDep) -> HealthView:
    """The last health check of the version (any caller who may use the adapter)."""
    return await serving.health(ref, principal)


@router.post("/v1/adapters/{ref}/health", response_model=HealthView, responses=ADMIN_ERRORS)
async def check_adapter(ref: Ref, serving: AdaptersServingDep, _: AdminDep) -> HealthView:
    """Check the version now: load it and generate a few tokens."""
    return await serving.check(ref)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
