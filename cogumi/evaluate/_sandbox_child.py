"""Runs inside the sandbox process: apply the limits, then run the program.

Invoked as ``python -I _sandbox_child.py SETTINGS_JSON`` by :mod:`cogumi.evaluate.sandbox`, with
the temporary directory as the working directory. Standard library only, and nothing imported
from cogumi: the fewer modules a program's process loads, the faster 164 of them start.

Order matters: resource limits first (a program must never run unlimited), then joining the
pids cgroup (root ignores RLIMIT_NPROC) while writing there is still allowed, then Landlock (it
must be applied by the process it confines, and survives ``exec``), and last the completion
marker is armed: it is written only after the program's last line ran, so ``sys.exit(0)`` or
``os._exit(0)`` before the tests does not count as passing.
"""

import ctypes
import json
import os
import resource
import runpy
import sys

# Landlock (linux/landlock.h)
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # same numbers on x86_64 and aarch64
_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_WRITE_FILE = 1 << 1
_WRITE_RIGHTS_ABI1 = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make *
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


def landlock(writable: list[str], block_network: bool) -> int:
    """Confine writes to ``writable`` (and TCP when asked); returns the ABI used, 0 if unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_RULESET_VERSION))
    if abi < 1:
        return 0
    rights = _WRITE_RIGHTS_ABI1 | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(rights, (_NET_BIND_TCP | _NET_CONNECT_TCP) if block_network and abi >= 4 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else 8
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    for path, allowed in [*((p, rights) for p in writable), ("/dev", _WRITE_FILE)]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = _PathBeneath(allowed, fd)
        if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return abi


def main() -> None:
    settings = json.loads(sys.argv[1])
    del sys.argv[1:]  # the program sees a clean argv
    limit = resource.setrlimit
    limit(resource.RLIMIT_CORE, (0, 0))
    limit(resource.RLIMIT_FSIZE, (settings["max_output_bytes"],) * 2)
    limit(resource.RLIMIT_CPU, (settings["cpu_s"], settings["cpu_s"] + 1))
    limit(resource.RLIMIT_AS, (settings["memory_bytes"],) * 2)
    if settings["cgroup_procs"]:
        # Root ignores RLIMIT_NPROC; a pids cgroup bounds the process count for everyone.
        with open(settings["cgroup_procs"], "w") as handle:
            handle.write(str(os.getpid()))
    if settings["nproc"]:
        limit(resource.RLIMIT_NPROC, (settings["nproc"],) * 2)
    if settings["landlock"]:
        landlock([os.getcwd()], block_network=not settings["network"])
    marker = settings["marker"]
    path = os.path.join(os.getcwd(), "program.py")
    sys.argv = [path]
    sys.path.insert(0, os.getcwd())
    runpy.run_path(path, run_name="__main__")
    # Only reached when the program's last line ran without raising SystemExit.
    with open(settings["marker_file"], "w") as handle:
        handle.write(marker)


if __name__ == "__main__":
    main()
