"""`GET /health`: liveness of this API process (no Redis round trip, nothing sensitive)."""

from fastapi import APIRouter

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
