"""The one request path below every front end.

`chat/`, `responses/` and `messages/` translate their wire format into a `CompletionRequest`
(`request.py`) and render a `Run`'s events back out; everything between is here: limits, the
operator's agent policy, function calling, structured output, sessions, queueing in job slots
(`submit.py`), following and collecting a run (`run.py`) and streaming it (`streaming.py`).
Front ends import `api.core`, never each other; `api.core` imports none of them (ruff TID251,
configured in each package's `ruff.toml`).
"""
