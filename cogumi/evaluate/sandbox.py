"""Run model-written programs (HumanEval, MBPP) where they cannot hurt the harness or the host.

The threat is accidental damage by generated code — an infinite loop, a memory or fork bomb,
endless printing, ``sys.exit(0)`` before the tests, ``shutil.rmtree`` on the wrong path, a
leaked API key sent somewhere — not a determined attacker with a kernel exploit. So each
program gets:

* its own process (``python -I``: no user site, no ``PYTHON*`` variables), in its own session
  so that a timeout kills the whole process group, grandchildren included;
* a fresh temporary directory as the working directory, removed afterwards;
* an environment built from scratch (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = the temp dir):
  nothing of the harness's environment, so no API keys;
* limits set by the child before the program starts (:mod:`cogumi.evaluate._sandbox_child`):
  wall-clock timeout, address space, CPU time, file size (stdout and stderr go to files, so
  endless output ends in SIGXFSZ), no core dumps, and a process count;
* a process-count limit: RLIMIT_NPROC for ordinary users; for root, which the kernel exempts
  from RLIMIT_NPROC, a pids cgroup of its own (cgroup v1 or v2, where writable), which also
  lets the harness kill children that left the process group. (Dropping to ``nobody`` is not
  an option: a Python installed under ``/root`` is unreadable to ``nobody``.)
* Linux Landlock (kernel >= 5.13) when available: writes allowed only beneath the temp dir
  (and to ``/dev/null``-style devices), and from Landlock ABI 4 no TCP connect or bind;
* a completion marker: passing needs exit code 0 *and* a random marker written after the
  program's last line, so exiting early with status 0 is caught.

:func:`isolation` reports which of these this host provides; eval summaries record it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


class SandboxError(RuntimeError):
    """The harness itself failed (Python would not start); never raised for a program's failure."""


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB."""
    max_processes: int = 16
    """Processes the program may have at once (RLIMIT_NPROC headroom)."""
    max_output_bytes: int = 1 << 20
    """Most bytes of stdout (and of stderr), and of any file the program writes."""
    network: bool = False
    """Allow TCP connect/bind (blocked only where Landlock ABI >= 4 is available)."""


@dataclass
class ExecResult:
    """How one program ended."""

    status: str
    """``passed``, ``failed`` (non-zero exit), ``timeout``, ``killed`` (by a signal: memory,
    output or CPU limit, crash) or ``exited_early`` (exit 0 before the program's end)."""
    passed: bool
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    error: str
    """One line saying what went wrong ("" when passed)."""

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _landlock_abi() -> int:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


@cache
def _pids_cgroup_root() -> Path | None:
    """A writable cgroup directory with the pids controller (only root gets one)."""
    if os.geteuid() != 0:
        return None
    for root in CGROUP_ROOTS:
        controllers = root / "cgroup.subtree_control"
        v2 = controllers.exists() and "pids" in controllers.read_text().split()
        if ((root / "pids.max").exists() or root.name == "pids" or v2) and os.access(root, os.W_OK):
            probe = root / f"cogumi-probe-{os.getpid()}"
            try:
                probe.mkdir()
                ok = (probe / "pids.max").exists()
            except OSError:
                continue
            finally:
                try:
                    probe.rmdir()
                except OSError:
                    pass
            if ok:
                return root
    return None


def isolation() -> dict:
    """What this host enforces for sandboxed programs."""
    abi = _landlock_abi() if sys.platform == "linux" else 0
    cgroup = _pids_cgroup_root()
    process_limit = (f"pids cgroup under {cgroup}" if cgroup else
                     "RLIMIT_NPROC" if os.geteuid() != 0 else None)
    return {
        "landlock_abi": abi or None,
        "writes_confined_to_temp_dir": abi >= 1,
        "network_blocked": abi >= 4,
        "process_limit": process_limit,
        "rlimits": ["AS", "CPU", "FSIZE", "CORE"] + (["NPROC"] if os.geteuid() != 0 else []),
        "timeout": "wall clock, whole process group (and cgroup) killed",
        "environment": "built from scratch (no inherited variables)",
    }


def _kill_cgroup(group: Path) -> None:
    """Kill whatever is left in ``group`` (children that escaped the session too), then remove it."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)  # the last killed processes are still being reaped


def _processes_of_uid(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _last_error_line(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        line = line.strip()
        if line and not line.startswith(("File ", "^", "~")) and (":" in line or line.endswith(("Error", "Exception"))):
            return line[:300]
    tail = stderr.strip().splitlines()
    return tail[-1][:300] if tail else ""


def _read(path: Path, limit: int, *, tail: bool = False) -> str:
    try:
        with path.open("rb") as handle:
            if tail:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - limit))
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_program(source: str, limits: Limits = Limits(), *, stdin: str = "", _parallel: int = 1) -> ExecResult:
    """Run ``source`` as a Python program under ``limits``."""
    workdir = Path(tempfile.mkdtemp(prefix="cogumi-sandbox-"))
    try:
        return _run_in(workdir, source, limits, stdin, _parallel)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir: Path, source: str, limits: Limits, stdin: str, parallel: int) -> ExecResult:
    (workdir / "program.py").write_text(source, encoding="utf-8")
    marker = secrets.token_hex(16)
    marker_file = workdir / f".done-{secrets.token_hex(8)}"
    group = None
    nproc = None
    cgroup_root = _pids_cgroup_root()
    if cgroup_root is not None:
        group = cgroup_root / f"cogumi-sandbox-{workdir.name}"
        group.mkdir()
        (group / "pids.max").write_text(str(limits.max_processes))
    elif os.geteuid() != 0:
        # RLIMIT_NPROC counts every process of the user, the harness's and parallel sandboxes' too.
        nproc = _processes_of_uid(os.geteuid()) + limits.max_processes + parallel
    settings = {
        "max_output_bytes": limits.max_output_bytes, "cpu_s": int(limits.timeout_s) + 1,
        "memory_bytes": limits.memory_mb << 20, "nproc": nproc,
        "cgroup_procs": str(group / "cgroup.procs") if group else None,
        "landlock": _landlock_abi() > 0, "network": limits.network, "marker": marker,
        "marker_file": str(marker_file),
    }
    import json

    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    stdout_path, stderr_path = workdir / "stdout", workdir / "stderr"
    start = time.perf_counter()
    timed_out = False
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", str(CHILD), json.dumps(settings)], cwd=workdir, env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)
        except OSError as exc:
            raise SandboxError(f"cannot start {sys.executable}: {exc}") from exc
        try:
            process.communicate(stdin.encode() if stdin else None, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Kill the whole group either way: a finished program may have left children behind.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            if group is not None:
                _kill_cgroup(group)
    duration = time.perf_counter() - start
    stdout = _read(stdout_path, limits.max_output_bytes)
    stderr = _read(stderr_path, min(limits.max_output_bytes, 64 << 10), tail=True)
    code = process.returncode
    if timed_out:
        status, error = "timeout", f"timed out after {limits.timeout_s:g} s"
    elif code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        why = {"SIGXFSZ": "output or file size limit", "SIGXCPU": "CPU time limit", "SIGSEGV": "crash",
               "SIGKILL": "killed (memory?)", "SIGABRT": "aborted"}.get(name, "signal")
        status, error = "killed", f"killed by {name} ({why})"
    elif code != 0:
        status, error = "failed", _last_error_line(stderr) or f"exit status {code}"
    elif _read(marker_file, 64) != marker:
        status, error = "exited_early", "exited with status 0 before the end (sys.exit/os._exit)"
    else:
        status, error = "passed", ""
    return ExecResult(status=status, passed=status == "passed", returncode=code, stdout=stdout, stderr=stderr,
                      duration_s=duration, error=error)


def run_programs(sources: list[str], limits: Limits = Limits(), *, workers: int | None = None,
                 progress: bool = False, desc: str = "sandbox") -> list[ExecResult]:
    """Run every program, ``workers`` at a time (default: one per CPU core); results in input order."""
    from tqdm.auto import tqdm

    workers = max(1, workers or os.cpu_count() or 1)
    results: list[ExecResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(sources), desc=desc, unit="program", disable=not progress) as bar:
        futures = {pool.submit(run_program, source, limits, _parallel=workers): i for i, source in enumerate(sources)}
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return results  # type: ignore[return-value]


__all__ = ["ExecResult", "Limits", "SandboxError", "isolation", "run_program", "run_programs"]
