"""The python tool's sandbox: a model's program run in a child interpreter with limits, its output returned as text.

The child is ``sys.executable -I -B`` (isolated: no user site, no PYTHON* variables) in a fresh temporary working
directory that is removed afterwards, in its own session and process group (killed whole at the wall limit). Before
the program runs the child sets its own rlimits (CPU time, address space, file size, processes) and installs an
audit hook that refuses sockets, writing or deleting outside its working directory, starting processes and
signalling other processes. A refused action raises PermissionError inside the child, so the program's traceback
is what the model sees. This is a guard against accidents and casual misuse by a model in training, not a boundary
against a determined attacker (ctypes, for one, can go around audit hooks): run untrusted code in a container too.

The limits are set by the child itself rather than through ``preexec_fn``, which is unsafe in a process with
threads (the environment runs tools in worker threads).

Layer 4 (envs): imports nothing from posttrain.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import IO

FILE_SIZE_MB = 16  # the largest file the program may write in its working directory

# Runs in the child as ``python -I -B -c BOOTSTRAP memory_bytes cpu_seconds file_bytes``; the program on stdin.
BOOTSTRAP = r'''
import os, resource, sys
def _sandbox():
    code = sys.stdin.read()
    mem, cpu, fsize = (int(a) for a in sys.argv[1:4])
    for name, value in (("RLIMIT_AS", mem), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", fsize), ("RLIMIT_NPROC", 0),
                        ("RLIMIT_CORE", 0)):
        res = getattr(resource, name, None)
        if res is None:
            continue
        try:
            hard = resource.getrlimit(res)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass  # not allowed here (RLIMIT_NPROC does not bind root): the audit hook still refuses spawning
    import _posixsubprocess, subprocess  # noqa: F401 (loaded now, so the program cannot get a fresh fork_exec)
    def no_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")
    _posixsubprocess.fork_exec = no_fork_exec
    root = os.path.realpath(os.getcwd())
    realpath, join, getcwd, fsdecode, fspath, getpid = (os.path.realpath, os.path.join, os.getcwd, os.fsdecode,
                                                        os.fspath, os.getpid)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    spawn = {"subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
             "pty.spawn", "os.startfile"}
    # event -> positions of the path arguments it changes
    changes = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.truncate": (0,),
               "os.chmod": (0,), "os.chown": (0,), "os.link": (1,), "os.symlink": (1,), "os.utime": (0,),
               "os.chdir": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,),
               "os.lchflags": (0,), "os.lchmod": (0,), "os.lchown": (0,), "shutil.rmtree": (0,),
               "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.unpack_archive": (1,),
               "shutil.make_archive": (0,)}
    def inside(path):
        if path is None or isinstance(path, int):
            return True  # an open file descriptor, or the default (the working directory)
        try:
            p = fsdecode(fspath(path))
        except TypeError:
            return False
        full = realpath(join(getcwd(), p))
        return full == root or full.startswith(root + os.sep)
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({path!r})")
        elif event.startswith("socket."):
            raise PermissionError(f"sandbox: no network ({event})")
        elif event in spawn:
            raise PermissionError(f"sandbox: starting processes is not allowed ({event})")
        elif event in changes:
            for i in changes[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed "
                                          f"({args[i]!r})")
        elif event in ("os.kill", "os.killpg") and args[0] not in (0, getpid()):
            raise PermissionError(f"sandbox: signalling other processes is not allowed ({event})")
        elif event == "import" and args[0] == "_posixsubprocess":
            raise PermissionError("sandbox: re-importing _posixsubprocess is not allowed")
    sys.addaudithook(hook)
    return code
def _main():
    import linecache, traceback
    code = _sandbox()
    linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<program>", "exec"), env)
    except SystemExit:
        raise
    except BaseException as exc:
        env.clear()  # after a MemoryError, free what the program held so the traceback can be printed
        sys.stdout.flush()
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)
_main()
'''


@dataclass
class Outcome:
    """What a run came to: the text the model sees, and whether the wall limit stopped it."""
    text: str
    timed_out: bool = False


class _Capture(threading.Thread):
    """Drains one pipe so the child never blocks on a full pipe, keeping its head (stdout) or tail (stderr)."""

    def __init__(self, stream: IO[bytes], keep: int, tail: bool):
        super().__init__(daemon=True)
        self.stream, self.keep, self.tail = stream, keep, tail
        self.data, self.dropped = bytearray(), False

    def run(self) -> None:
        try:
            while chunk := self.stream.read1(65536):
                room = self.keep - len(self.data)
                if self.tail:
                    self.data += chunk
                    if len(self.data) > self.keep:
                        del self.data[:len(self.data) - self.keep]
                        self.dropped = True
                elif room > 0:
                    self.data += chunk[:room]
                    self.dropped |= len(chunk) > room
                else:
                    self.dropped = True
        except (OSError, ValueError):
            pass

    def text(self) -> tuple[str, bool]:
        return self.data.decode("utf-8", errors="replace"), self.dropped


def _head(text: str, cut: bool, n: int) -> str:
    if len(text) > n or cut:
        return text[:n] + f"\n[output cut at {n} characters]"
    return text


def _tail(text: str, cut: bool, n: int) -> str:
    if len(text) > n or cut:
        return f"[output cut: the last {n} characters]\n" + text[-n:]
    return text


def _signal_text(rc: int, timeout_s: float) -> str:
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    if name == "SIGXCPU":
        return f"error: the program used more than its {math.ceil(timeout_s)} s of CPU time"
    if name == "SIGXFSZ":
        return f"error: the program wrote a file larger than {FILE_SIZE_MB} MB"
    return f"error: the program was killed by {name}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def execute(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 4000) -> Outcome:
    """Run ``code`` in the sandbox; every failure comes back as text (``Outcome.text``), never as an exception."""
    try:
        workdir = tempfile.mkdtemp(prefix="posttrain-python-")
    except OSError as exc:
        return Outcome(f"error: could not make a working directory for the program ({exc})")
    try:
        outcome = _execute(code, workdir, timeout_s, memory_mb, max_output_chars)
        outcome.text = outcome.text.rstrip() or "(the program printed nothing)"
        return outcome
    except Exception as exc:  # the contract is text, whatever went wrong on this side
        return Outcome(f"error: the sandbox failed ({type(exc).__name__}: {exc})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(code: str, workdir: str, timeout_s: float, memory_mb: int, max_output_chars: int) -> Outcome:
    limits = [str(memory_mb * 2 ** 20), str(math.ceil(timeout_s) + 1), str(FILE_SIZE_MB * 2 ** 20)]
    env = {"HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOTSTRAP, *limits], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        return Outcome(f"error: could not start python ({exc})")
    keep = 4 * max_output_chars + 1024  # bytes: enough for max_output_chars characters of UTF-8
    out, err = _Capture(proc.stdout, keep, tail=False), _Capture(proc.stderr, keep, tail=True)
    out.start()
    err.start()
    timed_out = False
    try:
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child died before reading its program; its exit status says why
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)  # also any process the program managed to leave behind
        proc.wait()
    out.join(timeout=2.0)
    err.join(timeout=2.0)
    stdout, stdout_cut = out.text()
    stderr, stderr_cut = err.text()
    if timed_out:
        text = f"error: the program ran past its {timeout_s:g} s limit"
        if stdout:
            text += "\nits output before it was stopped:\n" + _head(stdout, stdout_cut, max_output_chars)
        return Outcome(text, timed_out=True)
    if proc.returncode == 0:
        text = _head(stdout, stdout_cut, max_output_chars)
        if stderr:
            text += ("\n" if text else "") + _tail(stderr, stderr_cut, max(max_output_chars - len(text), 200))
        return Outcome(text or "(the program printed nothing)")
    head = (f"error: the program exited with code {proc.returncode}" if proc.returncode > 0
            else _signal_text(proc.returncode, timeout_s))
    err_room = max_output_chars if not stdout else max(max_output_chars // 2, max_output_chars - len(stdout))
    err_text = _tail(stderr, stderr_cut, err_room)
    out_text = _head(stdout, stdout_cut, max(max_output_chars - len(err_text), 0)) if stdout else ""
    return Outcome("\n".join(part for part in (head, out_text, err_text) if part))


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 4000) -> str:
    """The python tool: what the program printed (stdout, then stderr), capped at ``max_output_chars``; or an
    ``error: ...`` text for a timeout, a crash, a refused action or a nonzero exit (with its stderr's tail)."""
    return execute(code, timeout_s, memory_mb, max_output_chars).text
