"""The wheel: built from a copy of the source tree, it claims the import name orderstream
and nothing else, and holds every file of the folders pyproject maps beneath it
(sub-packages, migrations and their templates included). Installed into a fresh virtual
environment without its dependencies, it adds orderstream and its dist-info to
site-packages and nothing more, and its modules fail to import only for want of those
dependencies, never for a missing part of orderstream."""

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_LEFTOVERS = shutil.ignore_patterns(".*", "__pycache__", "*.pyc", "*.egg-info")
NOT_SHIPPED = {"build", "dist", "var", "tests", "bench", "docs"}


def left_behind(folder: str, names: list[str]) -> set[str]:
    """What the copy of the source tree leaves out: build leftovers anywhere, and the
    repository's own folders that are no part of the package."""
    return BUILD_LEFTOVERS(folder, names) | (NOT_SHIPPED & set(names) if Path(folder) == ROOT else set())

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built without build isolation from a copy of the source tree (so that the
    build leaves nothing in the repository)."""
    source = tmp_path_factory.mktemp("source") / "orderstream"
    shutil.copytree(ROOT, source, ignore=left_behind)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = out.glob("orderstream-*.whl")
    return wheel


def mapped_files() -> dict[str, Path]:
    """Every file of the folders pyproject's package-dir maps, by its path in the wheel."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files = {}
    for name, folder in package_dir.items():
        base = PurePosixPath(*name.split("."))
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT / folder)
            # Dotfiles are no package data (the pages' build leaves a stamp beside them).
            if path.is_file() and "__pycache__" not in relative.parts and path.suffix != ".pyc" \
                    and not path.name.startswith("."):
                files.setdefault(str(base / relative.as_posix()), path)
    return files


def top_level(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names}


def test_the_wheel_claims_orderstream_only(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    dist_info = {name for name in top_level(names) if name.endswith(".dist-info")}
    assert len(dist_info) == 1 and dist_info.pop().startswith("orderstream-")
    assert {name for name in top_level(names) if not name.endswith(".dist-info")} == {"orderstream"}


def test_the_wheel_holds_every_file_of_the_mapped_folders(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = mapped_files()
    assert "orderstream/schema/app.py" in expected
    assert any(PurePosixPath(name).match("orderstream/infrastructure/persistence/migrations/*/versions/*.py")
               for name in expected)
    missing = sorted(set(expected) - names)
    assert not missing, f"not in the wheel: {missing}"
    with zipfile.ZipFile(wheel) as archive:
        assert all(archive.read(name) == path.read_bytes() for name, path in expected.items())


IMPORT_EACH = """
import importlib, json, sys
results = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        results[name] = None
    except ModuleNotFoundError as error:
        results[name] = error.name
print(json.dumps({"results": results, "file": importlib.import_module("orderstream").__file__}))
"""


def test_installed_alone_it_adds_orderstream_only_and_lacks_nothing_of_its_own(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    # Without pip of its own: this interpreter's pip installs into it (pip's --python).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    [site_packages] = venv.glob("lib/python*/site-packages")
    before = {path.name for path in site_packages.iterdir()}
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    added = {path.name for path in site_packages.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"orderstream"}, added
    assert [name for name in added if name.endswith(".dist-info")] != []

    # Every module of the package; none may miss a part of orderstream.
    with zipfile.ZipFile(wheel) as archive:
        modules = sorted(
            name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in archive.namelist()
            if name.endswith(".py") and name != "orderstream/__main__.py" and "/migrations/" not in name)
    ran = subprocess.run([str(python), "-I", "-c", IMPORT_EACH, *modules], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert Path(report["file"]).is_relative_to(site_packages)
    missing = {module: name for module, name in report["results"].items() if name is not None}
    assert report["results"]["orderstream"] is None
    # What a module lacks is a declared dependency (as this environment, which has them
    # all, maps import names to distributions), never a part of orderstream.
    declared = {normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group())
                for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {module: name for module, name in missing.items()
                  if not declared & {normalized(dist) for dist in providers.get(name.split(".")[0], [])}}
    assert not undeclared, f"modules that lack something not among the dependencies: {undeclared}"
    # Without its dependencies the application itself cannot load.
    assert "orderstream.schema.app" in missing


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()
