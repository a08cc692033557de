"""The shell completion scripts, as shipped: `dumpproxy --completions bash|zsh|fish`.

The files in the source tree's `completions/` are the only copies. A checkout (or an
editable install) reads them there; an installed wheel has them among its data files
(pyproject.toml's `[tool.setuptools.data-files]`, under `<prefix>/share/...`), found
through the distribution's own file list, wherever the prefix is.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

FILES = {"bash": "dumpproxy.bash", "zsh": "_dumpproxy", "fish": "dumpproxy.fish"}


def locate(shell: str) -> Path:
    name = FILES[shell]
    checkout = Path(__file__).resolve().parent.parent / "completions" / name
    if checkout.is_file() and (checkout.parent.parent / "pyproject.toml").is_file():
        return checkout
    try:
        dist = metadata.distribution("dumpproxy")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"no {name} in {checkout.parent} and no installed "
                                f"dumpproxy distribution") from None
    for file in dist.files or ():
        if file.name == name and "share" in file.parts:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name} is not among the installed dumpproxy files")


def script(shell: str) -> bytes:
    return locate(shell).read_bytes()
