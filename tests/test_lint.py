"""The code base stays `ruff check` clean (the configuration is in pyproject.toml)."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "dumpproxy", "tests", "bench"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers_have_no_upward_imports() -> None:
    """import-linter's layers contract (pyproject.toml): every module listed, none imports
    a module above it; run-time imports inside functions count too."""
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout, r.stdout
