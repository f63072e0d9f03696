"""benchmarks/gpu_check.sh, the prepared GPU check, in its dry mode: every step runs end to end on the CPU at small
sizes, the CUDA parts skipped and said so, so the script's own bugs show up before a GPU is spent on it. And the
wheel folder it installs the GPU machine's missing packages from."""
import importlib.util
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_dry_run_end_to_end(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out"),
                           "--wheels", str(tmp_path / "no_wheels")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run" in done.stdout and "are skipped" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == result
    assert result["dry"] and all(result[s]["rc"] == 0 for s in ("tests", "bench", "step"))
    if not torch.cuda.is_available():  # every test of tests/test_cuda.py is selected by -m cuda, and skipped
        assert result["tests"]["tests"] == result["tests"]["skipped"] > 0
    assert result["bench"]["stage3 batch"]["ours (bf16 in, masks)"] > 0
    step = result["step"]
    assert step["model"] == "tiny (dry run)" and step["llm_layers"] == 3 and math.isfinite(step["loss"])
    assert step["step_s"] > 0 and step["peak_above_weights_and_adam_gib"] > 0
    assert result["plan_row_gib"]["B=4"] == 21.5  # the planning table's row for the measured setting


def fake_wheel(folder, name, version="1.0"):
    """A minimal pure-Python wheel of distribution `name` with one module of the same name."""
    module, dist_info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}.py", "VALUE = 42\n")
        z.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist_info}/RECORD", "")
    return path


def test_missing_packages_come_from_the_wheel_folder(tmp_path, monkeypatch):
    """A missing distribution whose wheel is in the folder is installed (pip --no-index --no-deps --target) into a
    folder the steps get on PYTHONPATH; one without a wheel is reported; installed ones are left alone."""
    monkeypatch.setattr(gpu_check, "WHEELS", {"aista-fake-a": "aista_fake_a", "aista-fake-b": "aista_fake_b",
                                              "torch": "torch"})
    fake_wheel(tmp_path, "aista-fake-a")
    site = tmp_path / "site"
    installed, status = gpu_check.install_wheels(tmp_path, site, tmp_path / "wheels.log")
    assert installed and status == {"aista-fake-a": "installed", "aista-fake-b": "no wheel"}
    out = subprocess.run([sys.executable, "-c", "import aista_fake_a; print(aista_fake_a.VALUE)"], text=True,
                         capture_output=True, env={"PYTHONPATH": str(site)}, check=True)
    assert out.stdout.strip() == "42"
