"""What routes receive from the app: its settings and its Redis connection pool."""

from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request

from shared.settings import Settings


@dataclass(frozen=True)
class Gateway:
    settings: Settings
    redis: ArqRedis


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]
