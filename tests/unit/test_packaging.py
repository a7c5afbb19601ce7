"""The wheel users install: the start-up .pth at the top of site-packages and every data file the
code opens at run time (an editable install reads them from src/, so only a built wheel shows them)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_startup_hook_and_the_package_data(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    [path] = tmp_path.glob("hybridlm-*.whl")
    wheel = zipfile.ZipFile(path)
    names = set(wheel.namelist())
    assert wheel.read("hybridlm_lm_eval.pth").decode().strip() == "import hybridlm.interop.lm_eval_startup"
    source = ROOT / "src"
    patterns = ("hybridlm/csrc/*.cpp", "hybridlm/interop/hf_remote/*.py", "hybridlm/recipes/*.toml",
                "hybridlm/serve/static/*")
    data_files = [path for pattern in patterns for path in source.glob(pattern)]
    assert len(data_files) >= 7
    assert {path.relative_to(source).as_posix() for path in data_files} <= names
    modules = {path.relative_to(source).as_posix() for path in (source / "hybridlm").rglob("*.py")}
    assert modules <= names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "[lm_eval.models]" in wheel.read(entry_points).decode()


def test_one_transformers_floor_is_declared_locked_and_checked():
    """pyproject's [hf] floor, the export's own check and the release .venv-hf-floor installs agree."""
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [declared] = [re.fullmatch(r"transformers>=([\d.]+)", spec).group(1) for spec in extras["hf"]]
    remote = (ROOT / "src/hybridlm/interop/hf_remote/configuration_hybridlm.py").read_text()
    checked = re.search(r'^TRANSFORMERS_FLOOR = "(.+)"$', remote, re.MULTILINE).group(1)
    locked = re.search(r"^transformers==(\S+)$", (ROOT / "requirements/hf-floor.lock").read_text(), re.MULTILINE)
    assert checked == locked.group(1)
    assert checked.split(".")[:2] == declared.split(".")[:2] and checked.endswith(".0")
    below = re.search(r"^transformers==(\S+)$", (ROOT / "requirements/hf-below-floor.lock").read_text(), re.MULTILINE)
    assert tuple(map(int, below.group(1).split("."))) < tuple(map(int, checked.split(".")))
