"""Install diffrl into a virtual environment with uv, seeing the package indexes pip is configured with.

    python scripts/uv_install.py VENV_PYTHON -c constraints.txt -e '.[dev,ocr,clip,video]'

``make`` calls this first and falls back to pip when it fails (exit status non-zero, one line on stderr).
uv installs the same packages in about 25 s where pip takes about 2 minutes on the project's 2-core machine
(most of it unpacking torch's CUDA wheels), but it reads neither pip's configuration files nor its
environment variables. This passes them on: ``index-url``, ``extra-index-url``, ``find-links``,
``constraint`` (for example a machine-wide cap on torch) and ``cert``, from ``pip config list`` (which merges
the files and PIP_* variables). uv is told to pick the best version over all indexes, as pip does (its own
default takes the first index that has a package, which can be an older local mirror).

uv is also told to compile bytecode, as pip does by default and uv does not: where PYTHONDONTWRITEBYTECODE is
set (it is on this project's VM; a CI runner may set it too) no ``.pyc`` is ever written afterwards, and every
Python process then compiles torch, transformers and diffusers from source again: 10 s instead of 4.5 s to
import them here, and the test suite, which starts a few hundred processes, took 19 min 45 s from a fresh clone
against about 12 minutes. Compiling at install adds about 5 s.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path


def pip_settings(python: str) -> dict[str, list[str]]:
    """pip's effective settings, ``{name: [values]}`` (later sources win, as in pip)."""
    done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        settings[name] = value.split()
    return settings


def uv_arguments(settings: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The uv command-line options and environment that give uv pip's view of the package indexes."""
    args = ["--index-strategy", "unsafe-best-match"]
    env = {}
    for url in settings.get("index-url", [])[:1]:
        args += ["--index-url", url]
    for url in settings.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for where in settings.get("find-links", []):
        args += ["--find-links", where]
    for path in settings.get("constraint", []):
        if Path(path).is_file():
            args += ["-c", path]
    for path in settings.get("cert", [])[:1]:
        env["SSL_CERT_FILE"] = path
    return args, env


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: python scripts/uv_install.py VENV_PYTHON PIP_INSTALL_ARGS...", file=sys.stderr)
        return 2
    python, rest = sys.argv[1], sys.argv[2:]
    uv = shutil.which("uv", path=str(Path(python).parent))
    if uv is None:
        fetched = subprocess.run([python, "-m", "pip", "install", "--quiet", "uv"], capture_output=True, text=True)
        uv = shutil.which("uv", path=str(Path(python).parent))
        if fetched.returncode or uv is None:
            print("note: uv could not be installed; installing with pip (about 2 minutes)", file=sys.stderr)
            return 1
    args, env = uv_arguments(pip_settings(python))
    done = subprocess.run([uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", python, *args, *rest],
                          env={**os.environ, **env})
    if done.returncode:
        print("note: uv could not install diffrl (its message is above); installing with pip", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
