#!/usr/bin/env python3
"""Set up a virtual environment on first use, then run the connector or its tests.

    python3 dev.py serve [--port 8000]   run the connector on its embedded defaults
    python3 dev.py test [pytest args]    run the test suite

Needs only Python 3.11 or newer. The environment lives in `.venv` and is reinstalled whenever
`pyproject.toml` changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-from"


def ensure_environment() -> None:
    """Create `.venv` and install the project with its test extras, unless already current."""
    if sys.version_info < (3, 11):
        sys.exit(f"proximity-sync needs Python 3.11 or newer; this is {sys.version.split()[0]}.")

    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == wanted:
        return

    if not (BIN / "python").exists():
        print("Creating .venv ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("Installing proximity-sync and its test dependencies into .venv ...", file=sys.stderr)
    subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f"{ROOT}[test]"],
        check=True,
    )
    STAMP.write_text(wanted)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"serve", "test"}:
        sys.exit(__doc__)
    command, arguments = sys.argv[1], sys.argv[2:]
    ensure_environment()

    if command == "serve":
        program = [str(BIN / "proximity-sync"), "serve", *arguments]
    else:
        program = [str(BIN / "python"), "-m", "pytest", *arguments]
    if command == "test":
        os.chdir(ROOT)
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
