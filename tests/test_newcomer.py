"""A newcomer's path outside a checkout: labkit installed from a wheel into a fresh virtual environment, one chapter
copied alone into an empty folder. With the chapter's first cell (the Colab cell) it fetches the course and loads
the earlier chapter it builds on; without it, the load stops with a message that says where it looked and what to do.

The fresh environment gets labkit from the wheel only; its dependencies (torch, ipykernel, ...) come from this
environment's site-packages through a .pth line, so nothing is downloaded. The "clone" is of this repository
(LABKIT_REPO=file://...), and the kernel has the network blocked (tests/offline) like every notebook run.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from labkit.notebook import tags_of

from .conftest import NOTEBOOKS, ROOT

pytestmark = pytest.mark.slow
LOADS_A_CHAPTER = re.compile(r"labkit\.notebook\.(load|as_module)\(")
CHAPTER = next(nb for nb in NOTEBOOKS if nb.name.startswith("04_"))     # LoRA loads chapter 01's GPT early


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh venv with labkit from a wheel, and a Jupyter kernel spec that runs it."""
    tmp = tmp_path_factory.mktemp("newcomer")
    src = tmp / "src"                     # built from a copy: setuptools writes build/ beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "labkit"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, text=True)
    wheel = next((tmp / "dist").glob("labkit-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    (Path(site) / "course_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.check_output([str(python), "-c", "import labkit; print(labkit.__file__)"], text=True,
                                    cwd=tmp).strip()
    assert where.startswith(str(venv)), f"the fresh venv imports labkit from {where}, not from the wheel"
    spec = tmp / "jupyter" / "kernels" / "fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    return tmp


def chapter_alone(folder: Path, with_first_cell: bool) -> Path:
    """The chapter copied into an empty folder, up to its first cell that loads another chapter."""
    nb = nbformat.read(CHAPTER, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    last = next(i for i, c in enumerate(code) if LOADS_A_CHAPTER.search(c.source))
    nb.cells = code[:last + 1] if with_first_cell else [c for c in code[:last + 1] if "colab" not in tags_of(c)]
    folder.mkdir()
    nbformat.write(nb, folder / CHAPTER.name)
    return folder / CHAPTER.name


def run_in_fresh_kernel(path: Path, fresh: Path, clone: Path, monkeypatch) -> nbformat.NotebookNode:
    import nbclient

    monkeypatch.setenv("JUPYTER_PATH", str(fresh / "jupyter"))
    monkeypatch.setenv("LABKIT_CLONE", str(clone))
    monkeypatch.setenv("LABKIT_REPO", ROOT.as_uri())
    monkeypatch.delenv("LABKIT_NOTEBOOKS", raising=False)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="fresh", timeout=600, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def errors(nb) -> list[dict]:
    return [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="the first cell clones this repository: needs a git checkout")
def test_a_chapter_alone_runs_with_its_first_cell(fresh, tmp_path, monkeypatch):
    path = chapter_alone(tmp_path / "alone", with_first_cell=True)
    nb = run_in_fresh_kernel(path, fresh, tmp_path / "course", monkeypatch)
    assert not errors(nb), "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors(nb))
    assert (tmp_path / "course" / "notebooks" / "01_mingpt.ipynb").is_file(), "the first cell did not fetch the course"
    said = "".join(o.get("text", "") for o in nb.cells[0].get("outputs", []))
    assert "the course is in" in said


def test_without_the_first_cell_the_load_says_what_to_do(fresh, tmp_path, monkeypatch):
    path = chapter_alone(tmp_path / "alone", with_first_cell=False)
    nb = run_in_fresh_kernel(path, fresh, tmp_path / "no-clone", monkeypatch)
    (err,) = errors(nb)
    print(err["evalue"])
    assert err["ename"] == "FileNotFoundError"
    assert "Looked in" in err["evalue"] and "first cell" in err["evalue"] and "LABKIT_NOTEBOOKS" in err["evalue"]
    assert str(tmp_path / "alone") in err["evalue"]                      # the folder the chapter is in was searched


def test_the_first_cell_does_nothing_in_a_checkout():
    """In a checkout the cell only imports labkit and finds the chapters: no clone, no pip."""
    from labkit.notebook import colab_cell, repo_url

    env = dict(os.environ, LABKIT_CLONE="/nonexistent/clone", LABKIT_REPO="file:///nonexistent")
    proc = subprocess.run([sys.executable, "-c", colab_cell(repo_url())], cwd=ROOT / "notebooks", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and not Path("/nonexistent/clone").exists()
