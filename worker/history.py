"""A stateless request's earlier turns, given to Claude Code as a transcript to resume.

The CLI sends the model only turns it has in a session transcript, so earlier turns written into
the prompt would reach the model as one flattened user message. Instead, the earlier turns become
the JSONL entries the CLI itself writes for user and assistant messages (a chain linked by
`parentUuid`), served by a `SessionStore` that holds nothing else; the SDK materializes it for
`resume` before the CLI starts, and the model sees real alternating turns. Nothing is kept:
what the run mirrors back is dropped.
"""

import time
import uuid
from typing import Any

from claude_agent_sdk import SessionKey, SessionStoreEntry

from shared.jobs import Turn


def merged(turns: list[Turn]) -> list[Turn]:
    """Adjacent turns of one role as one turn (the CLI would otherwise put a made-up assistant
    reply between two user messages)."""
    out: list[Turn] = []
    for turn in turns:
        if out and out[-1].role == turn.role:
            last = out[-1]
            text = "\n\n".join(part for part in (last.text, turn.text) if part)
            out[-1] = Turn(role=turn.role, text=text, images=[*last.images, *turn.images])
        else:
            out.append(turn)
    return out


BLANK = "(no content)"
"""What a turn of no text stands for (Claude Code's own words for an empty prompt): the model API
refuses an empty or whitespace-only text (an earlier empty turn of a chat failed the job), and the
CLI answers a blank prompt with nothing, without asking the model."""


def content_blocks(turn: Turn) -> str | list[dict[str, Any]]:
    """A turn as Anthropic message content: images first, then the text (or just the text); a
    blank user turn is `BLANK`, a blank assistant turn empty (the CLI words that one itself)."""
    text = turn.text if turn.text.strip() else ""
    if turn.role == "assistant":
        return [{"type": "text", "text": text}]
    if not turn.images:
        return text or BLANK
    blocks: list[dict[str, Any]] = [
        {"type": "image", "source": image.model_dump(exclude_none=True)} for image in turn.images
    ]
    if text:
        blocks.append({"type": "text", "text": text})
    return blocks


def transcript(session_id: str, cwd: str, model: str, turns: list[Turn]) -> list[SessionStoreEntry]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    entries: list[SessionStoreEntry] = []
    parent: str | None = None
    for turn in turns:
        entry_id = str(uuid.uuid4())
        message: dict[str, Any] = {"role": turn.role, "content": content_blocks(turn)}
        if turn.role == "assistant":
            message |= {"id": f"msg_{entry_id.replace('-', '')}", "type": "message", "model": model}
            message |= {"stop_reason": "end_turn", "stop_sequence": None}
            message["usage"] = {"input_tokens": 0, "output_tokens": 0}
        entry: dict[str, Any] = {
            "type": turn.role,
            "uuid": entry_id,
            "parentUuid": parent,
            "isSidechain": False,
            "timestamp": stamp,
            "sessionId": session_id,
            "cwd": cwd,
            "userType": "external",
            "message": message,
        }
        entries.append(entry)  # type: ignore[arg-type]
        parent = entry_id
    return entries


class HistoryStore:
    """A read-only `SessionStore` holding one transcript (duck-typed: `append` and `load`)."""

    def __init__(self, session_id: str, entries: list[SessionStoreEntry]) -> None:
        self.session_id = session_id
        self._entries = entries

    @classmethod
    def of(cls, cwd: str, model: str, turns: list[Turn]) -> "HistoryStore":
        session_id = str(uuid.uuid4())
        return cls(session_id, transcript(session_id, cwd, model, turns))

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """The run's own transcript is not kept: the request is stateless."""

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return self._entries if key["session_id"] == self.session_id else None
