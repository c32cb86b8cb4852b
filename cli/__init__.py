"""The `claude-gateway` command: `up` (everything on one machine), `api`, `worker`."""

import argparse


def add_commands(
    group: "argparse._SubParsersAction[argparse.ArgumentParser]", summaries: dict[str, str]
) -> None:
    """Subcommands that say what they do in their own `--help` too, not only in their list."""
    for name, summary in summaries.items():
        group.add_parser(name, help=summary, description=summary)
