"""The code-execution sandbox: hostile programs are contained and counted as failures.

Every test here is safe on a shared machine even if a layer fails: the fork bombs either
meet the audit hook before their first fork or run only where RLIMIT_NPROC holds, and the
process spawner without the hook is bounded.
"""
import os
import sys
import time
from pathlib import Path

import pytest

from recipe_engine_plugins.evaluation import sandbox
from recipe_engine_plugins.evaluation.sandbox import SandboxLimits, run_program

QUICK = SandboxLimits(timeout_s=3, cpu_s=2, memory_mb=512, max_processes=8)


def _group_members(pgid: int) -> list[int]:
    """Processes (anywhere on the machine) whose process group or session is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid or int(fields[3]) == pgid:  # pgrp, session
            members.append(int(entry.name))
    return members


def _descendants() -> int:
    """How many processes descend from this test process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - mine
        mine |= frontier
    return len(mine)


def _gone(result) -> bool:
    """No process is left in the sandbox's group or session (allowing the kernel a moment
    to reap what a SIGKILL hit)."""
    for _ in range(50):
        if not _group_members(result.pgid):
            return True
        time.sleep(0.1)
    return False


def test_correct_solution_passes_and_assertion_fails():
    program = "def add(a, b):\n    return a + b\n"
    ok = run_program(program, "assert add(2, 3) == 5\nprint('checked')\n", QUICK)
    assert ok.outcome == "passed" and ok.passed and "checked" in ok.stdout
    assert ok.layers["audit"] and ok.layers["rlimits"]
    bad = run_program("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n", QUICK)
    assert bad.outcome == "failed" and not bad.passed and "AssertionError" in bad.stderr
    error = run_program("def add(a, b) return\n", "assert add(2, 3) == 5\n", QUICK)
    assert error.outcome == "error" and "SyntaxError" in error.detail


def test_os_system_is_refused_and_nothing_is_written(tmp_path):
    victim = tmp_path / "pwned"
    result = run_program(f"import os\nos.system('echo pwned > {victim}')\n", "", QUICK)
    assert result.outcome == "refused" and not result.passed
    assert result.refused == ["os.system"]
    assert not victim.exists()
    # catching the refusal does not turn it into a pass
    sneaky = run_program(f"import os\ntry:\n    os.system('echo pwned > {victim}')\n"
                         "except Exception:\n    pass\n", "", QUICK)
    assert sneaky.outcome == "refused" and not victim.exists()


def test_infinite_loop_times_out_and_its_group_is_gone():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", "", SandboxLimits(timeout_s=2, cpu_s=30))
    assert result.outcome == "timeout" and "wall clock" in result.detail
    assert time.monotonic() - start < 15
    assert _gone(result)
    # the CPU limit ends it too, before a long wall-clock limit
    cpu = run_program("while True:\n    pass\n", "", SandboxLimits(timeout_s=60, cpu_s=1))
    assert cpu.outcome == "timeout" and cpu.duration_s < 30, cpu
    assert _gone(cpu)


def test_fork_bomb_is_refused_and_leaves_no_process():
    before = _descendants()
    result = run_program("import os\nwhile True:\n    os.fork()\n", "", QUICK)
    assert result.outcome == "refused" and result.refused == ["os.fork"]
    assert _gone(result)
    assert _descendants() == before
    for program in ("import subprocess\nsubprocess.run(['true'])\n",
                    "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
                    "import ctypes\n", "import os\nos.execv('/bin/true', ['true'])\n"):
        assert run_program(program, "", QUICK).outcome == "refused", program


def test_processes_left_behind_are_killed_without_the_audit_hook():
    """With the hook off, a program that starts 10 sleeping children and returns leaves
    nothing behind: the PID namespace (or the group kill) ends them all."""
    program = ("import os, time\n"
               "for _ in range(10):\n"
               "    if os.fork() == 0:\n"
               "        time.sleep(120)\n"
               "        os._exit(0)\n")
    before = _descendants()
    result = run_program(program, "", SandboxLimits(timeout_s=10, max_processes=64),
                         audit=False)
    assert result.outcome in ("passed", "error"), result  # error: RLIMIT_NPROC stopped a fork
    assert _gone(result)
    assert _descendants() == before


@pytest.mark.skipif(os.geteuid() == 0 and not sandbox._nobody_can_run(sys.executable),
                    reason="RLIMIT_NPROC does not bind root, and user nobody cannot run this "
                           "interpreter: a fork bomb without the audit hook would be unbounded")
def test_fork_bomb_without_the_hook_meets_rlimit_nproc():
    before = _descendants()
    result = run_program("import os\nwhile True:\n    os.fork()\n", "",
                         SandboxLimits(timeout_s=5, cpu_s=2, max_processes=8), audit=False)
    assert not result.passed
    assert result.layers["nproc_enforced"]
    assert _gone(result)
    assert _descendants() == before


def test_ten_gigabytes_fail_on_memory():
    result = run_program("data = bytearray(10 * 1024 ** 3)\n", "", QUICK)
    assert result.outcome == "memory" and "MemoryError" in result.detail


def test_network_is_refused():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    result = run_program(program, "", QUICK)
    assert result.outcome == "refused" and result.refused[0].startswith("socket.")
    raw = run_program(program, "", QUICK, audit=False)  # the namespace alone
    assert not raw.passed
    if raw.layers.get("netns"):
        assert "Network is unreachable" in raw.detail or "Connection refused" in raw.detail


def test_writes_stay_in_a_scratch_directory_that_is_removed(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("x")
    program = ("import os, tempfile\n"
               "open('notes.txt', 'w').write('ok')\n"
               "fd, name = tempfile.mkstemp()\n"
               "print(os.getcwd())\n")
    result = run_program(program, "assert open('notes.txt').read() == 'ok'\n", QUICK)
    assert result.passed, result
    scratch = result.stdout.strip().splitlines()[-1]
    assert not Path(scratch).exists()
    for hostile in (f"open({str(keep / 'file')!r}, 'a').write('y')\n",
                    f"import shutil\nshutil.rmtree({str(keep)!r})\n",
                    f"import os\nos.remove({str(keep / 'file')!r})\n"):
        assert run_program(hostile, "", QUICK).outcome == "refused", hostile
    assert (keep / "file").read_text() == "x"


def test_exits_are_not_passes():
    for program in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"):
        result = run_program("def f():\n    return 1\n", program, QUICK)
        assert not result.passed and result.outcome == "error", (program, result)


def test_limits_are_checked():
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(max_processes=-1)
