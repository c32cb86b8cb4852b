"""A small stdio MCP server for the tests: an operator would configure it as
`{"notes": {"command": "<python>", "args": ["tests/mcp_server.py"]}}`.

Its one tool, `stamp`, returns its text stamped with a marker the model could not make up, plus
the server's own environment variable `STAMP_SUFFIX` (how a test sees the operator's `env`).
"""

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("notes")


@server.tool()
def stamp(text: str) -> str:
    """Returns the text with the notes server's stamp."""
    return f"stamped-by-mcp[{text}]{os.environ.get('STAMP_SUFFIX', '')}"


if __name__ == "__main__":
    server.run("stdio")
