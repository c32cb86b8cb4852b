"""The models this gateway serves: the configured ids (`MODELS`), their aliases (`MODEL_ALIASES`),
a dated snapshot id of either (`claude-sonnet-4-5-20250929` for `claude-sonnet-4-5`), with
`MODELS_FROM_UPSTREAM` the model API's own list, and, with `MODEL_PASS_THROUGH`, any other id
handed to Claude Code as sent. An id of a family the gateway does not serve is never mapped to
another model: it is 404 unless configured."""

import asyncio
import contextlib
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import OpenAIError
from shared import upstream_models
from shared.settings import Settings
from shared.upstream_models import UpstreamModel

OWNER = "anthropic"
_SNAPSHOT = re.compile(r"(?P<family>.+)-(?P<date>20\d{6})")
"""Anthropic's snapshot ids: a family id and the snapshot's date (YYYYMMDD)."""


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class AnthropicModel(BaseModel):
    """A model as Anthropic's Models API shows it (to a client that sends `anthropic-version`)."""

    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str
    """RFC 3339."""
    lifecycle: Literal["active"] = "active"
    """Every model the gateway serves can be used."""

    @classmethod
    def of(cls, model: Model) -> "AnthropicModel":
        created = datetime.fromtimestamp(model.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(id=model.id, display_name=display_name(model.id), created_at=created)


class AnthropicModelList(BaseModel):
    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


def display_name(model_id: str) -> str:
    """`claude-sonnet-4-5` → `Claude Sonnet 4.5`, `claude-3-5-haiku-20241022` → `Claude 3.5 Haiku`."""
    snapshot = _SNAPSHOT.fullmatch(model_id)
    words: list[str] = []
    for part in (snapshot["family"] if snapshot else model_id).split("-"):
        if part.isdigit() and words and words[-1][-1].isdigit():
            words[-1] += "." + part
        else:
            words.append(part.capitalize())
    return " ".join(words)


class UpstreamCatalog:
    """This API process's copy of the upstream model list (workers fetch it into Redis)."""

    REFRESH_S = 30.0

    def __init__(self) -> None:
        self.models: list[UpstreamModel] = []
        self.ids: frozenset[str] = frozenset()

    async def refresh(self, redis: Redis) -> None:
        self.models = await upstream_models.read(redis)
        self.ids = frozenset(model.id for model in self.models)

    async def follow(self, redis: Redis) -> None:
        """Keeps the copy fresh for the chat path, which resolves models without a round trip."""
        while True:
            with contextlib.suppress(RedisError):  # the last copy stays; an outage shows elsewhere
                await self.refresh(redis)
            await asyncio.sleep(self.REFRESH_S)


UPSTREAM = UpstreamCatalog()


_PASSABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}")
"""A model id run as sent: the model API's, Bedrock's (`us.anthropic.…-v1:0`, ARNs) and Vertex's
(`…@20240620`) shapes. It goes on Claude Code's command line: a 140,000-character id, or one with
a NUL, failed the CLI's start (an outside probe)."""


def resolve_model(model: str, settings: Settings) -> str:
    """The full model id to run for the id a caller sent; 404 `model_not_found` if it is not served."""
    if (served := _served(model, settings)) is not None:
        return served
    if settings.model_pass_through and _PASSABLE.fullmatch(model):
        return model
    raise _not_found(model)


def _served(model: str, settings: Settings, *, aliased: bool = True) -> str | None:
    """The configured model an id names: itself, an alias of a served one (or of any, with
    MODEL_PASS_THROUGH: an alias of a model not served had run jobs with it, an outside probe), or
    a dated snapshot of either."""
    snapshot = _SNAPSHOT.fullmatch(model)
    for name in [model, snapshot["family"]] if snapshot else [model]:
        if name in settings.models:
            return name
        if aliased and (target := settings.model_aliases.get(name)) is not None:
            served = settings.model_pass_through or _served(target, settings, aliased=False) is not None
            return target if served else None
    if settings.models_from_upstream and model in UPSTREAM.ids:
        return model
    return None


def _not_found(model: str) -> OpenAIError:
    shown = model if len(model) <= 256 else model[:256] + "…"  # not a long id's whole echo
    message = f"The model '{shown}' does not exist or you do not have access to it."
    return OpenAIError.not_found(message, param="model", code="model_not_found")


def served_model(model: str, settings: Settings) -> Model:
    """One model of `served_models`, or a dated id of one; 404 `model_not_found` for any other id,
    pass-through or not (the gateway cannot know which ids the model API accepts)."""
    if _served(model, settings) is None:
        raise _not_found(model)
    return Model(id=model, created=settings.models_created, owned_by=OWNER)


def served_models(settings: Settings) -> list[Model]:
    """The configured models, then each alias (an id a caller may send as well), then the model
    API's own models not listed already."""
    ids = [*settings.models, *(alias for alias in settings.model_aliases if _served(alias, settings))]
    served = [Model(id=model, created=settings.models_created, owned_by=OWNER) for model in ids]
    if settings.models_from_upstream:
        listed = set(ids)
        served += [
            Model(id=model.id, created=model.created, owned_by=OWNER)
            for model in UPSTREAM.models
            if model.id not in listed
        ]
    return served
