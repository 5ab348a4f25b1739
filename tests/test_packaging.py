"""What a non-editable install carries: the shipped search spaces and the console scripts."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "mixcl-data-prep": "data_prep.cli:main",
    "mixcl-tune": "mixcl_ray.tune:main",
    "mixcl-pretrain": "mixcl_ray.pretrain:main",
    "mixcl-finetune": "mixcl_ray.finetune:main",
    "mixcl-report": "mixcl_ray.report:main",
    "mixcl-predict": "mixcl_ray.predict:main",
    "mixcl-evaluate": "mixcl_ray.evaluate:main",
}


@pytest.mark.slow
def test_a_wheel_install_finds_the_shipped_spaces_by_name_and_has_the_commands(tmp_path):
    def pip(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    pip("wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"))
    (wheel,) = (tmp_path / "wheel").glob("mixcl_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (ROOT / "tune_spaces").glob("*.yaml"))
    assert (
        sorted(Path(n).name for n in names if n.startswith("tune_spaces/") and n.endswith(".yaml"))
        == shipped
    )
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text, text

    pip("install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel))
    code = (
        "import mixcl_ray, sys\n"
        "from mixcl_ray.spaces import load_space\n"
        "from mixcl_ray.tune import DEFAULT_SPACE\n"
        "print(mixcl_ray.__file__)\n"
        "print(load_space('demo').name, load_space(DEFAULT_SPACE).name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: only the installed copy can answer
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed, names_found = proc.stdout.splitlines()
    assert installed.startswith(str(tmp_path / "site"))
    assert names_found == "demo demo"
    for script in SCRIPTS:
        assert (tmp_path / "site" / "bin" / script).exists(), script
