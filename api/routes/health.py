"""`GET /health`: liveness of this API process (no Redis round trip, nothing sensitive). `HEAD`
too, as `/ready`: some load balancers probe with it."""

from fastapi import APIRouter

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict[str, str]:
    return {"status": "ok"}
