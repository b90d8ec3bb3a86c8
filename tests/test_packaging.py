"""Packaging: the distribution installs the single top-level package ``arq_gym``.

The repository's ``agents/`` folder installs as ``arq_gym.agents`` (setup.cfg ``package_dir``):
a top-level ``agents`` would clash with other distributions that install one (the OpenAI
Agents SDK, for one).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OWN = "arq_gym"


def _setup_cfg_options() -> tuple[list[str], dict[str, str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packages = cfg.get("options", "packages").split()
    package_dir = {}
    for line in cfg.get("options", "package_dir", fallback="").splitlines():
        if line.strip():
            name, _, folder = line.partition("=")
            package_dir[name.strip()] = folder.strip()
    return packages, package_dir


def _source_dir(package: str, package_dir: dict[str, str]) -> Path:
    """The folder setuptools takes ``package`` from (the longest mapped prefix wins)."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return REPO / package_dir[prefix] / Path(*parts[i:])
    return REPO / Path(*parts)


def _finder_mapping(finder: Path) -> dict[str, str]:
    """The ``MAPPING`` (package name -> folder) of setuptools' editable finder module."""
    for node in ast.parse(finder.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "MAPPING" for t in targets):
                return ast.literal_eval(node.value)
    raise AssertionError(f"no MAPPING in {finder}")


def test_setup_cfg_installs_only_arq_gym_and_every_source_package():
    packages, package_dir = _setup_cfg_options()
    assert all(p == OWN or p.startswith(OWN + ".") for p in packages), packages
    assert package_dir == {"arq_gym.agents": "agents"}
    listed = {_source_dir(p, package_dir).resolve() for p in packages}
    for p in packages:
        assert (_source_dir(p, package_dir) / "__init__.py").is_file(), p
    # a subpackage that is not listed would be missing from the wheel
    for root in (REPO / "arq_gym", REPO / "agents"):
        for init in root.rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is not in setup.cfg packages"


def _installed_distribution() -> importlib.metadata.Distribution:
    """The installed arq-gym; build metadata inside the checkout (an ``arq_gym.egg-info`` that
    an older build left there, seen when Python runs from the checkout) is not an install."""
    for dist in importlib.metadata.distributions(name="arq-gym"):
        if Path(str(dist.locate_file(""))).resolve() != REPO:
            return dist
    pytest.skip("arq-gym is not installed (pip install -e .)")


def test_installed_distribution_has_no_other_top_level_module():
    dist = _installed_distribution()
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == [OWN]
    files = [Path(str(f)) for f in dist.files or []]
    finders = [f for f in files if f.name.startswith("__editable__") and f.suffix == ".py"]
    if finders:  # editable install: setuptools' finder maps package names to folders
        mapping = _finder_mapping(Path(dist.locate_file(finders[0])))
        assert mapping, "the editable finder maps nothing"
        assert all(k == OWN or k.startswith(OWN + ".") for k in mapping), mapping
    else:  # regular install: every file lies in arq_gym/, its dist-info or bin/
        for f in files:
            top = f.parts[0]
            assert top in (OWN, "..") or top.endswith(".dist-info"), f


def test_arq_gym_agents_imports_without_a_top_level_agents(tmp_path):
    """From a folder that is not the checkout, every built-in agent resolves and a user's
    ``module:Class`` still imports from the working directory."""
    (tmp_path / "my_agent.py").write_text("class Mine:\n    def run_episode(self):\n        pass\n")
    code = (
        "import sys\n"
        "from arq_gym import agents\n"
        "classes = [agents.get(n) for n in agents.available()]\n"
        "assert all(c.__module__.startswith('arq_gym.agents.') for c in classes), classes\n"
        "assert agents.get('my_agent:Mine').__name__ == 'Mine'\n"
        "assert 'agents' not in sys.modules, sys.modules['agents']\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_wheel_holds_only_arq_gym(tmp_path):
    """A wheel built from the sources holds arq_gym/ (with agents/ as arq_gym/agents/ and the
    rl-zoo3 hyperparameters) and its dist-info, and imports from where it is unpacked."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("arq_gym", "agents"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(wheels), str(src)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = wheels.glob("arq_gym-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {OWN}, tops
    for need in ("arq_gym/agents/__init__.py", "arq_gym/agents/base.py", "arq_gym/agents/sb3.py",
                 "arq_gym/hyperparams/td3.yml", "arq_gym/hyperparams/dqn.yml",
                 "arq_gym/models/weights/manifest.json"):  # fmt: skip
        assert need in names, need
    site = tmp_path / "site"
    code = (
        "import sys\n"
        "import arq_gym, arq_gym.agents as agents\n"
        "from arq_gym.hyperparams import path\n"
        f"root = {str(site)!r}\n"
        "assert arq_gym.__file__.startswith(root) and agents.__file__.startswith(root)\n"
        "assert agents.get('random').__module__ == 'arq_gym.agents.random_search'\n"
        "assert str(path('ppo')).startswith(root) and path('ppo').is_file()\n"
        "assert 'agents' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
