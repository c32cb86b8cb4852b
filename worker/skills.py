"""Skills for jobs: the operator's skills directory (`CLAUDE_SKILLS_DIR`, default
`~/.claude/skills`), copied into each job's own Claude config directory.

A copy, not a link: a job's tools can write to its config directory, and must not change the
skills of later jobs. The CLI finds them as user skills, so a job with skills loads the `user`
setting source, which is that fresh per-job directory (never anything from the workspace).
"""

import shutil
from pathlib import Path

from worker.workspace import Workspace


def installed_skills(skills_dir: Path | None) -> list[str]:
    """The names of the skills in `skills_dir` (directories holding a SKILL.md)."""
    if skills_dir is None:
        return []
    root = skills_dir.expanduser()
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if (entry / "SKILL.md").is_file())


def install_skills(skills_dir: Path, names: list[str], workspace: Workspace) -> None:
    target = workspace.config / "skills"
    for name in names:
        shutil.copytree(skills_dir.expanduser() / name, target / name, symlinks=False)
