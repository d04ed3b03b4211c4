"""Starting runs from the UI's form: which configs it may start, which overrides it refuses, the processes it owns.

The form never runs code of its own choosing. It starts ``python -m posttrain METHOD CONFIG overrides...`` (an
argument list, never a shell) on one of the example configs shipped with posttrain or a YAML file inside the runs
directory; its overrides are the CLI's ``key=value`` and go through the config schema before anything starts. Keys
whose values name Python code or programs (reward functions and environments as ``package.module:name``, the vLLM
interpreter and its arguments) are refused from the form, and so is a config that already names such code: those
runs start from the command line, where whoever types them can read what they run. The run's folder is always
RUNS/<name>, a new one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posttrain.errors import ConfigError, DataError
from posttrain.ui.browse import RunNotFound, valid_name

# Override keys the form refuses, and why. A key is refused when it is one of these, lies under one (env.name) or
# holds one (``rollout={vllm_python: ...}`` sets rollout.vllm_python).
CODE_KEYS = {
    "rewards": "reward functions may name Python code (package.module:fn)",
    "watch": "watch terms are reward functions, which may name Python code (package.module:fn)",
    "env": "an environment may name Python code (package.module:MyEnv)",
    "rollout.vllm_python": "it names an interpreter for the run to start",
    "rollout.vllm_args": "they are arguments of a program the run starts",
}
FORM_KEYS = {
    "output_dir": "the run's folder is the runs directory plus the run name: set the name instead",
    "method": "the method is the config file's own",
}
MAX_RUNNING = 4  # processes the form may have going at once: a shared UI should not be able to flood the machine
TAIL_LINES = 40
STOP_GRACE_S = 10.0  # after SIGTERM, the process group gets this long to exit before SIGKILL

# check(config path, overrides) -> the validated config as plain data (its model_dump); raises ConfigError. The CLI
# layer passes posttrain.config's load_config here: this layer does not read configs itself.
Check = Callable[[Path, list[str]], dict[str, Any]]


class FormError(ValueError):
    """A form the UI will not start; the message is what the page shows."""


def refused_overrides(overrides: list[str]) -> list[str]:
    """One line per override the form may not set (code paths, the run's folder, the method)."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for table in (CODE_KEYS, FORM_KEYS):
            for k, why in table.items():
                if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                    out.append(f"override {item!r}: {k} cannot be set from the form: {why}")
    return out


def code_in_config(cfg: dict[str, Any]) -> list[str]:
    """The places in a validated config that name Python code or a program: the form refuses to start it."""
    out = []
    for section in ("rewards", "watch"):
        for i, term in enumerate(cfg.get(section) or []):
            if ":" in str(term.get("name", "")):
                out.append(f"{section}[{i}].name = {term['name']!r} is Python code")
    env = cfg.get("env") or {}
    if ":" in str(env.get("name", "")):
        out.append(f"env.name = {env['name']!r} is Python code")
    rollout = cfg.get("rollout") or {}
    if rollout.get("vllm_python"):
        out.append(f"rollout.vllm_python = {rollout['vllm_python']!r} is a program to start")
    return out


def _method_of(path: Path) -> str | None:
    try:
        m = re.search(r"^method:\s*['\"]?([\w-]+)", path.read_text(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


@dataclass
class Launch:
    name: str
    folder: Path
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    def state(self) -> dict[str, Any]:
        code = self.proc.poll()
        status = "running" if code is None else "stopped" if self.stop_requested else \
            "finished" if code == 0 else "failed"
        tail = _tail(self.log_path)
        error = None
        if status == "failed":
            # The CLI's own refusal (ConfigError, DataError: "error: FILE, row N, field 'x': ...") is its last word.
            error = next((ln.removeprefix("error: ") for ln in reversed(tail) if ln.startswith("error: ")),
                         f"exited with status {code}" + (f": {tail[-1]}" if tail else ""))
        return {"name": self.name, "status": status, "returncode": code, "pid": self.proc.pid,
                "argv": self.argv[1:], "started": self.started, "tail": tail, "error": error}


def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    # rich redraws progress in place with carriage returns: keep what each line ended as.
    return list(deque((ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip()), maxlen=lines))


class Launcher:
    """Starts and stops the form's runs. ``examples_dir`` holds the example configs (the repo's examples/);
    relative data paths in them resolve against its parent, as in the README's commands."""

    def __init__(self, runs_dir: Path, examples_dir: Path | None, check: Check):
        self.runs_dir = Path(runs_dir).resolve()
        self.examples_dir = Path(examples_dir).resolve() if examples_dir else None
        self.check = check
        self.launches: dict[str, Launch] = {}
        self._lock = threading.Lock()

    def examples(self) -> dict[str, str]:
        """{file name: method} of the example configs."""
        if self.examples_dir is None or not self.examples_dir.is_dir():
            return {}
        found = {p.name: _method_of(p) for p in sorted(self.examples_dir.glob("*.yaml"))}
        return {name: method for name, method in found.items() if method}

    def config_files(self) -> list[str]:
        """YAML files inside the runs directory (two levels deep), relative to it: configs the form may start."""
        files = [*self.runs_dir.glob("*.yaml"), *self.runs_dir.glob("*/*.yaml"), *self.runs_dir.glob("*.yml"),
                 *self.runs_dir.glob("*/*.yml")]
        names = (p.relative_to(self.runs_dir) for p in files)
        return sorted(str(n) for n in names if not any(part.startswith(".") for part in n.parts))

    def _config(self, form: dict[str, Any]) -> tuple[Path, Path]:
        """(config file, the working directory its relative paths are read against)."""
        example, config = form.get("example") or "", form.get("config") or ""
        if bool(example) == bool(config):
            raise FormError("choose an example config or a config file under the runs directory (one of them)")
        if example:
            if example not in self.examples():
                raise FormError(f"{example!r} is not one of the example configs: {', '.join(self.examples())}")
            return self.examples_dir / example, self.examples_dir.parent
        path = (self.runs_dir / str(config)).resolve()
        if self.runs_dir not in path.parents:
            raise FormError(f"config {config!r} is not inside the runs directory {self.runs_dir}")
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            raise FormError(f"config {config!r}: no YAML file of that name in the runs directory")
        return path, Path.cwd()

    def prepare(self, form: Any) -> tuple[list[str], Path, Path]:
        """(argv, working directory, run folder) of a form, or a FormError with the reason."""
        if not isinstance(form, dict):
            raise FormError("the form must be a JSON object")
        name = form.get("name")
        if not isinstance(name, str) or not valid_name(name):
            raise FormError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, one folder)")
        folder = self.runs_dir / name
        if folder.exists():
            raise FormError(f"{folder} already exists: choose another run name")
        overrides = form.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise FormError("overrides must be a list of key=value strings")
        overrides = [o.strip() for o in overrides if o.strip()]
        refused = refused_overrides(overrides)
        if refused:
            raise FormError("\n".join(refused))
        config, cwd = self._config(form)
        try:
            cfg = self.check(config, [*overrides, f"output_dir={folder}"])
        except (ConfigError, DataError, FileNotFoundError) as exc:
            raise FormError(str(exc)) from None
        code = code_in_config(cfg)
        if code:
            raise FormError(f"{config.name} names code, which the form does not run; start it with `posttrain "
                            f"{cfg.get('method')} {config}` instead:\n  " + "\n  ".join(code))
        argv = [sys.executable, "-m", "posttrain", str(cfg["method"]), str(config), *overrides,
                f"output_dir={folder}"]
        return argv, cwd, folder

    def start(self, form: Any) -> Launch:
        argv, cwd, folder = self.prepare(form)
        with self._lock:
            running = sum(launch.proc.poll() is None for launch in self.launches.values())
            if running >= MAX_RUNNING:
                raise FormError(f"{running} runs started here are still going (at most {MAX_RUNNING}); stop one")
            if folder.name in self.launches and self.launches[folder.name].proc.poll() is None:
                raise FormError(f"a run named {folder.name!r} is already going")
            log_dir = self.runs_dir / ".ui"
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"{folder.name}.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
            with open(log_path, "wb") as log:
                # Its own session (process group): Stop signals the run and every process it started.
                proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env)
            launch = Launch(folder.name, folder, argv, log_path, proc)
            self.launches[folder.name] = launch
        return launch

    def stop(self, name: str) -> Launch:
        launch = self.launches.get(name)
        if launch is None:
            raise RunNotFound(f"no run named {name!r} was started here")
        if launch.proc.poll() is None:
            launch.stop_requested = True
            _signal_group(launch.proc, signal.SIGTERM)
            threading.Thread(target=_kill_later, args=(launch.proc,), daemon=True).start()
        return launch

    def alive(self, name: str) -> bool | None:
        """Whether the form's process for run ``name`` is alive; None when the form did not start it."""
        launch = self.launches.get(name)
        return None if launch is None else launch.proc.poll() is None

    def stop_all(self) -> None:
        for name, launch in list(self.launches.items()):
            if launch.proc.poll() is None:
                self.stop(name)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the pid is the group's id: the process leads its own session
    except ProcessLookupError:
        pass


def _kill_later(proc: subprocess.Popen) -> None:
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
