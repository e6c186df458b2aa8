"""What `pip install .` ships: every package and data file the server imports.

The tests run from the checkout, where a package missing from pyproject.toml still
imports; an installed server would fail at start (`compat_server.store` once did).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_server_is_listed_for_installation() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("compat_server", "providers")
        for path in (ROOT / top).rglob("*")
        if path.is_file()
        and path.suffix in (".py", ".json", ".js", ".css")
        and "__pycache__" not in path.parts
    }
    assert found <= listed, sorted(found - listed)
