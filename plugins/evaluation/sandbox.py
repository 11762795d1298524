"""Running untrusted Python (a model's completion and its test) in a contained child process.

``run_program(program, test)`` starts a fresh interpreter (``python -I -S``: no user site, no
site-packages, no ``PYTHON*`` variables) in a new session, with an almost empty environment and
a fresh scratch directory as its working directory, ``HOME`` and ``TMPDIR``; it is removed
afterwards. A small bootstrap (``BOOTSTRAP`` below, run by that interpreter) sets up the
layers below, then runs ``program`` and ``test`` in one ``__main__`` namespace. The result is
a ``SandboxResult``: ``outcome`` is one of ``passed``, ``failed`` (an ``AssertionError`` or a
failed doctest), ``error`` (any other exception, a syntax error, an exit, a crash),
``timeout`` (wall clock or CPU), ``memory`` (``MemoryError``) or ``refused`` (the program
attempted something the audit hook refuses), with the tails of stdout and stderr.

The layers, and what each one does and does not guarantee:

1. **Resource limits** (``setrlimit``, soft = hard, so the program cannot raise them):
   CPU seconds, address space, processes (``RLIMIT_NPROC``), file size, open files, no core
   files. ``RLIMIT_NPROC`` counts every process of the *user*, and the kernel does not enforce
   it for root: when the engine runs as root the bootstrap drops to ``nobody`` if that user
   can run the interpreter (probed once); otherwise the process cap does not hold and the
   layers below contain a fork bomb (``SandboxResult.layers`` says what was in force).
2. **Namespaces**, where the kernel allows unprivileged user namespaces:
   ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)``. The new network namespace has no
   interface but a down loopback, so nothing can be reached. The program runs as process 1 of
   a new PID namespace: when it ends, or is killed, the kernel kills every process it left.
3. **Process group kill**: the child leads its own session; on the wall-clock timeout, and
   after every run, the parent sends ``SIGKILL`` to the whole group.
4. **An audit hook** (``sys.addaudithook``, installed before the program runs) refuses:
   sockets, ``subprocess``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``,
   ``os.fork``/``forkpty``, ``os.kill``/``killpg``, importing ``ctypes``/``_ctypes`` (and
   any ``ctypes.*`` event), ``_posixsubprocess``, ``gc.get_objects``/``get_referrers``,
   ``resource.setrlimit``, opening a file for writing and removing, renaming or changing any
   path outside the scratch directory (``/dev/null`` excepted). An audit hook is not a
   security boundary: Python code that already holds a C-level primitive can bypass it, which
   is why ``ctypes`` is refused and why layers 1-3 are the containment that counts. Reading
   files is allowed.
5. **An honest pass signal**: the program passes only when the bootstrap itself, after the
   test ran to its end, writes a per-run nonce to a result file. ``sys.exit(0)`` or
   ``os._exit(0)`` in a completion is a failure, not a pass. A program written to inspect
   the bootstrap's frames could forge it; a sampled completion does not do that by accident.

Not done: no seccomp filter, no cgroup (so no cap on processes for root when ``nobody``
cannot run the interpreter; the audit hook and the PID namespace stand in), no mount
namespace (files the engine's user may read are readable).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["OUTCOMES", "SandboxLimits", "SandboxResult", "run_program"]

OUTCOMES = ("passed", "failed", "error", "timeout", "memory", "refused")
NOBODY = 65534
REFUSED_MARK = "sandbox: refused "


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, parent side
    cpu_s: int = 10  # RLIMIT_CPU (soft; hard = soft + 1)
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 16  # RLIMIT_NPROC (counts all processes of the user)
    max_file_mb: int = 16  # RLIMIT_FSIZE, stdout and stderr included
    max_open_files: int = 64  # RLIMIT_NOFILE
    tail_chars: int = 2000  # how much of stdout / stderr the result keeps

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{key}={value} must be > 0")


@dataclass
class SandboxResult:
    outcome: str  # one of OUTCOMES
    detail: str = ""  # the exception line, the refused event, or why it ended
    duration_s: float = 0.0
    returncode: int | None = None
    stdout: str = ""  # tails
    stderr: str = ""
    refused: list[str] = field(default_factory=list)  # audit events refused
    layers: dict[str, Any] = field(default_factory=dict)  # what was in force
    pgid: int = 0  # the child's process group (and session) id

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


# Runs as `python -I -S -c BOOTSTRAP <json config>`; the standard library only.
BOOTSTRAP = r'''
import json, os, sys, traceback
cfg = json.loads(sys.argv[1])
del sys.argv[1:]
with open(cfg["nonce_file"]) as f:
    nonce = f.read().strip()
os.remove(cfg["nonce_file"])
result = open(cfg["result_file"], "a", buffering=1)
with open(cfg["program_file"]) as f:
    program = f.read()
with open(cfg["test_file"]) as f:
    test = f.read()
os.remove(cfg["program_file"])
os.remove(cfg["test_file"])

def emit(**record):
    record["nonce"] = nonce
    result.write(json.dumps(record) + "\n")
    result.flush()

import resource
lim = cfg["limits"]
MB = 1 << 20
for name, value in (("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
                    ("RLIMIT_AS", (lim["memory_mb"] * MB,) * 2),
                    ("RLIMIT_NPROC", (lim["max_processes"],) * 2),
                    ("RLIMIT_FSIZE", (lim["max_file_mb"] * MB,) * 2),
                    ("RLIMIT_NOFILE", (lim["max_open_files"],) * 2),
                    ("RLIMIT_CORE", (0, 0))):
    resource.setrlimit(getattr(resource, name), value)

layers = {"rlimits": True, "uid": os.getuid(),
          "nproc_enforced": os.geteuid() != 0, "netns": False, "pidns": False}
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
def unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
if cfg["namespaces"]:
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)
        layers["netns"] = layers["pidns"] = True
    except OSError as err:
        layers["unshare_error"] = str(err)
        try:
            unshare(CLONE_NEWUSER | CLONE_NEWNET)
            layers["netns"] = True
        except OSError:
            pass
for name in ("ctypes", "_ctypes", "ctypes._endian"):
    sys.modules.pop(name, None)

pid = 0
if layers["pidns"]:
    # the program runs as process 1 of the new PID namespace; when it ends, the kernel
    # kills whatever it left behind
    try:
        pid = os.fork()
    except OSError as err:  # RLIMIT_NPROC already reached by the user's other processes
        layers["pidns"], layers["fork_error"] = False, str(err)
    if pid:
        _, status, usage = os.wait4(pid, 0)
        emit(kind="exit", status=status, cpu_s=usage.ru_utime + usage.ru_stime,
             maxrss_kb=usage.ru_maxrss)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status)
                 else 128 + os.WTERMSIG(status))

emit(kind="layers", layers=layers)
scratch = os.path.realpath(cfg["scratch"])
refused = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DENY = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
        "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "resource.setrlimit",
        "resource.prlimit", "pty.spawn", "os.startfile", "sys.remote_exec", "_posixsubprocess")
DENY_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess")  # fork_exec has no audit event
MUTATE = ("os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
          "os.mkdir", "os.symlink", "os.link", "os.utime", "os.chflags", "os.setxattr",
          "os.removexattr", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile",
          "shutil.copymode", "shutil.copystat", "shutil.chown", "shutil.move")
realpath, fspath = os.path.realpath, os.fspath

def inside(path):
    try:
        path = fspath(path)
    except TypeError:
        return True  # an fd: already open
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    full = realpath(path)
    return full == scratch or full.startswith(scratch + os.sep) or full == "/dev/null"

def refuse(event, why):
    refused.append(event)
    os.write(2, ("\n%s%s: %s\n" % (cfg["refused_mark"], event, why)).encode())
    raise PermissionError("sandbox: %s is not allowed (%s)" % (event, why))

def hook(event, args):
    if event == "import":
        if args[0] in DENY_IMPORTS or args[0].split(".")[0] in DENY_IMPORTS:
            refuse("import " + args[0], "module not allowed")
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            refuse("open", "writing outside the scratch directory: %r" % (path,))
        return
    if event.startswith(DENY):
        refuse(event, "not allowed")
    if event.startswith(MUTATE):
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                refuse(event, "outside the scratch directory: %r" % (arg,))

def main():
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    phase = "program"
    try:
        code = compile(program, "<program>", "exec")
        phase = "test"
        test_code = compile(test, "<test>", "exec")
        sys.addaudithook(hook) if cfg["audit"] else None
        phase = "program"
        exec(code, g)
        phase = "test"
        exec(test_code, g)
    except BaseException as err:
        traceback.print_exc()
        kind = ("refused" if refused else "memory" if isinstance(err, MemoryError)
                else "failed" if isinstance(err, AssertionError) and phase == "test"
                else "error")
        line = traceback.format_exception_only(type(err), err)[-1].strip()
        emit(kind="result", outcome=kind, detail="%s: %s" % (phase, line), refused=refused)
        return
    sys.stdout.flush()
    if refused:
        emit(kind="result", outcome="refused", detail="refused: " + ", ".join(refused),
             refused=refused)
    else:
        emit(kind="result", outcome="passed", detail="", refused=[])
main()
sys.stdout.flush()
os._exit(0)
'''


@lru_cache(maxsize=None)
def _nobody_can_run(python: str) -> bool:
    """As root, RLIMIT_NPROC holds only for another user: can ``nobody`` run ``python``?"""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run([python, "-I", "-S", "-c", "import json, doctest"],
                              user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text[-chars:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, test: str = "", limits: SandboxLimits | None = None, *,
                audit: bool = True, namespaces: bool = True, drop_root: bool = True,
                python: str | None = None) -> SandboxResult:
    """Run ``program`` then ``test`` (Python source, one namespace) in a contained child.

    ``audit=False`` and ``namespaces=False`` switch those layers off: for tests of the other
    layers only. ``drop_root``: as root, run as ``nobody`` when it can run the interpreter."""
    limits = limits or SandboxLimits()
    python = python or sys.executable
    nonce = secrets.token_hex(16)
    as_nobody = drop_root and _nobody_can_run(python)
    work = Path(tempfile.mkdtemp(prefix="recipe-sandbox-"))
    try:
        scratch = work / "scratch"
        scratch.mkdir()
        files = {"program_file": work / "program.py", "test_file": work / "test.py",
                 "nonce_file": work / "nonce", "result_file": work / "result.jsonl"}
        files["program_file"].write_text(program, encoding="utf-8")
        files["test_file"].write_text(test, encoding="utf-8")
        files["nonce_file"].write_text(nonce)
        files["result_file"].touch()
        out_path, err_path = work / "stdout", work / "stderr"
        cfg = {**{k: str(v) for k, v in files.items()}, "scratch": str(scratch),
               "limits": asdict(limits), "audit": audit, "namespaces": namespaces,
               "refused_mark": REFUSED_MARK}
        extra: dict[str, Any] = {}
        if as_nobody:
            for path in [work, scratch, *files.values()]:
                os.chown(path, NOBODY, NOBODY)
            extra = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONIOENCODING": "utf-8"}
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", BOOTSTRAP, json.dumps(cfg)], cwd=scratch, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                close_fds=True, **extra)
        pgid = proc.pid  # a new session: its leader's pid is the group id
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(pgid)  # the whole group, on timeout and after a normal exit alike
        proc.wait()
        duration = time.monotonic() - start
        records = []
        for line in files["result_file"].read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("nonce") == nonce:
                records.append(record)
        result = SandboxResult(
            outcome="error", duration_s=duration, returncode=proc.returncode,
            stdout=_tail(out_path, limits.tail_chars), stderr=_tail(err_path, limits.tail_chars),
            pgid=pgid)
        for record in records:
            if record.get("kind") == "layers":
                result.layers = {**record["layers"], "audit": audit, "process_group": True}
                if as_nobody:
                    result.layers["nproc_enforced"] = True
        final = next((r for r in records if r.get("kind") == "result"), None)
        exit_record = next((r for r in records if r.get("kind") == "exit"), None)
        cpu_used = exit_record.get("cpu_s", 0.0) if exit_record else 0.0
        if timed_out:
            result.outcome, result.detail = "timeout", f"wall clock over {limits.timeout_s:g} s"
        elif final is not None:
            result.outcome = final.get("outcome") if final.get("outcome") in OUTCOMES else "error"
            result.detail = str(final.get("detail", ""))
            result.refused = [str(e) for e in final.get("refused", [])]
        elif cpu_used >= limits.cpu_s or proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            result.outcome, result.detail = "timeout", f"CPU time over {limits.cpu_s} s"
        elif proc.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
            result.detail = f"wrote more than {limits.max_file_mb} MB (RLIMIT_FSIZE)"
        else:
            result.detail = f"exited with status {proc.returncode} before the test finished"
        if not result.passed and REFUSED_MARK in result.stderr and result.outcome == "error":
            result.outcome = "refused"  # refused, then died before reporting
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
