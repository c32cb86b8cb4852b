"""The relay benchmark's second floor: a plain FastAPI + sse-starlette server that streams the
scripted backend in its own process (the original wrapper's architecture: no queue, no Redis, no
worker), with the gateway's chunk shape. `bench/stream_latency.py` starts it beside the gateway.

    .venv/bin/python bench/inprocess_server.py PORT
"""

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.jobs import CompletionJob, Delta, Turn
from shared.settings import Settings
from worker.backends.scripted import ScriptedBackend

backend = ScriptedBackend(Settings(backend="scripted"))
app = FastAPI()


@app.post("/v1/chat/completions")
async def completions(request: Request) -> EventSourceResponse:
    body: dict[str, Any] = await request.json()
    model = str(body["model"])
    prompt = Turn(role="user", text=body["messages"][-1]["content"])
    job = CompletionJob(request_id="bench", model=model, turns=[prompt])
    created = int(time.time())

    async def chunks() -> AsyncIterator[str]:
        async for event in backend.stream(job):
            if isinstance(event, Delta) and event.text:
                delta = {"content": event.text}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                yield json.dumps(
                    {
                        "id": job.id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                )
        yield "[DONE]"

    return EventSourceResponse(chunks())


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
