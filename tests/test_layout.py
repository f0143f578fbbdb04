"""The repository's layout: the top level of the design card, three import packages in their folders."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The user's design card, plus bench/ and docs/.
TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "server",
    "lfm2audio",
    "clients",
    "tests",
    "docker",
    "Dockerfile",
    "bench",
    "docs",
}

# Import name -> folder, as pyproject.toml installs them.
PACKAGES = {
    "lfm2audio": "lfm2audio",
    "lfm2audio_server": "server",
    "lfm2audio_client": "clients/python/lfm2audio_client",
}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_top_level_is_the_design_card():
    top = {path.split("/")[0] for path in _tracked()}
    assert {name for name in top if not name.startswith(".")} == TOP_LEVEL


def test_pyproject_installs_every_package_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    assert mapping == {name: folder for name, folder in PACKAGES.items() if name != folder}
    # Every folder with an __init__.py inside the three packages is listed (the list is explicit).
    found = set()
    for name, folder in PACKAGES.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert set(setuptools["packages"]) == found


def test_folder_names_do_not_import():
    """``server`` (the folder) is not a second name of ``lfm2audio_server``, even from the checkout root."""
    for code, message in (
        ("import server", "imports as lfm2audio_server, not server"),
        ("import clients.python.lfm2audio_client", "imports as lfm2audio_client, not clients.python.lfm2audio_client"),
    ):
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr, (code, r.stderr)
    r = subprocess.run(
        [sys.executable, "-c", "import lfm2audio_server, lfm2audio_client; print(lfm2audio_server.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and Path(r.stdout.strip()) == REPO / "server" / "__init__.py", r.stderr
