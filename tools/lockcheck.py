"""Check that this interpreter's installed distributions are exactly the lock file's, and say which differ.

Run by the Makefile after installing from the lock: a venv reused from an earlier, unlocked install can still hold
other versions or extra packages (an extra `kernels` package, for one, changes which 4-bit kernel bitsandbytes
runs), and then the suite would not be testing what the lock promises.

    python tools/lockcheck.py requirements.lock     # exit 0 when they match, 1 with the differences otherwise
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

IGNORED = {"posttrain"}  # the project itself, installed editable from the checkout


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for num, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}, line {num}: expected 'name==version', got {line!r}")
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()
            if canonical(d.metadata["Name"]) not in IGNORED}


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = [f"{n}: locked {v}, installed {have[n]}" for n, v in sorted(pins.items()) if n in have and have[n] != v]
    out += [f"{n}: locked {v}, not installed" for n, v in sorted(pins.items()) if n not in have]
    out += [f"{n}: installed {v}, not in the lock" for n, v in sorted(have.items()) if n not in pins]
    return out


def main(argv: list[str]) -> int:
    lock = Path(argv[0] if argv else "requirements.lock")
    diff = differences(read_lock(lock), installed())
    if diff:
        print(f"this environment differs from {lock}:\n  " + "\n  ".join(diff), file=sys.stderr)
        print("start from a clean venv (`make clean`, then `make test`), or take new versions with `make lock`",
              file=sys.stderr)
        return 1
    print(f"environment matches {lock} ({len(read_lock(lock))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
