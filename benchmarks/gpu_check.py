"""The prepared GPU check (docs/gpu.md): one CUDA GPU, under 8 minutes, one JSON line at the end.

    bash benchmarks/gpu_check.sh              # on the GPU machine; outputs in $OUT when set, else gpu_check_out/
    bash benchmarks/gpu_check.sh --dry-run    # anywhere: every step on the CPU at small sizes (also without CUDA)

The machine needs PyTorch, transformers, peft, sacrebleu and safetensors. What it may lack (soundfile with cffi and
pycparser, soxr, POT, GeomLoss, flash-sinkhorn) comes from a folder of wheels (--wheels, default wheels/ in the
checkout, git-ignored), filled beforehand on any machine with network:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --platform manylinux2014_x86_64 --implementation cp -d wheels soundfile cffi pycparser soxr pot
    pip download --no-deps -d wheels geomloss flash-sinkhorn

Each missing distribution whose wheel is there is installed with `pip install --no-index --no-deps --target` into
a temporary folder put on PYTHONPATH for the steps. Steps, each a subprocess with its own time limit and log:

  tests  pytest -m cuda tests/test_cuda.py (passed / failed / skipped from its JUnit XML)
  bench  benchmarks/bench_ot.py --only-gpu-shapes --device cuda: ms per call of the stage-3 batch and of one
         stage-2 block beside GeomLoss, POT's solve_batch and flash-sinkhorn (dry: --quick on the CPU)
  step   one stage-3 step at the full Qwen2-7B shape with random weights (tiny.REAL_CONFIGS: Whisper-large-v2,
         BEATs cpt2, Qwen2-7B), bf16 autocast, --align ot --layers 0 1, per-device batch 4, no gradient
         checkpointing, built and stepped by gpu_plan.py's own code (measure_step): peak memory of the steady-state
         steps (torch.cuda.max_memory_allocated: weights, AdamW state, gradients, activations) and step time, beside the planning table's row of
         docs/gpu.md for that setting (dry: the tiny checkpoints of tiny.py, batch 1, 1-s clips, on the CPU)

Files in the output folder (OUTPUTS): gpu_check.json (the last line), wheels.log, <step>.log, pytest_cuda.xml,
bench_ot.json, step.json.
"""
import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = {"soundfile": "soundfile", "cffi": "cffi", "pycparser": "pycparser", "soxr": "soxr", "POT": "pot",
          "geomloss": "geomloss", "flash-sinkhorn": "flash_sinkhorn"}  # distribution -> wheel file prefix
LIMITS = dict(tests=170, bench=150, step=130)  # seconds per step: 450 s in all, under the 8 minutes
PLAN_ROW = "| stage 3, OT on the selected layers | off |"  # docs/gpu.md's planning row (Qwen2-7B comes first)
BATCH = 4
OUTPUTS = ("gpu_check.json", "wheels.log", "tests.log", "pytest_cuda.xml", "bench.log", "bench_ot.json", "step.log",
           "step.json")  # 8 files: what comes back from the GPU machine's $OUT
TINY_QFORMER = ["--qformer-hidden", "32", "--qformer-heads", "2", "--qformer-ffn", "64"]  # the dry run's (tests')


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at small sizes (also without CUDA)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_check_out"),
                   help="output folder (default: $OUT, else gpu_check_out/ in the checkout)")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels for what the machine lacks")
    p.add_argument("--stage3-step", metavar="JSON", help=argparse.SUPPRESS)  # the step, run in its own process
    return p


def missing_distributions():
    missing = []
    for dist in WHEELS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


def install_wheels(wheels, site, log):
    """Install the missing distributions' wheels into the folder `site` -> (whether anything was installed there,
    {distribution: "installed" | "no wheel" | "install failed ..."}) for the missing distributions."""
    missing = missing_distributions()
    found = {d: sorted(Path(wheels).glob(f"{WHEELS[d]}-*.whl")) if Path(wheels).is_dir() else [] for d in missing}
    status = {d: "installed" if found[d] else "no wheel" for d in missing}
    files = [str(f[-1]) for f in found.values() if f]
    if not files:
        return False, status
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
           *files]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        status = {d: "install failed (see wheels.log)" if found[d] else s for d, s in status.items()}
        return False, status
    return True, status


def run_step(name, cmd, out, env, limit):
    """Run one step with its log in out/<name>.log -> dict(rc, seconds[, timed_out])."""
    t = time.time()
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            res = dict(rc=rc)
        except subprocess.TimeoutExpired:
            res = dict(rc=None, timed_out=f"stopped after {limit} s")
    res["seconds"] = round(time.time() - t, 1)
    print(f"[{name}] {res}", flush=True)
    return res


def junit_counts(path):
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return dict(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"])


def plan_row():
    """The planning table's row for the measured setting: {"B=1": GiB, ...} from docs/gpu.md (README.md before it)."""
    for doc in (ROOT / "docs" / "gpu.md", ROOT / "README.md"):
        if doc.is_file():
            for line in doc.read_text().splitlines():
                if line.startswith(PLAN_ROW):
                    cells = [c.strip() for c in line.split("|")[3:7]]
                    return dict(source=doc.name, **{f"B={b}": float(re.match(r"[\d.]+", c).group())
                                                    for b, c in zip((1, 2, 4, 8), cells)})
    return None


def stage3_step(path, dry):
    """The step (in its own process): gpu_plan.measure_step at full depth -> JSON at `path`."""
    sys.path.insert(0, str(ROOT))
    import torch
    import gpu_plan
    import tiny
    device = torch.device("cpu" if dry else "cuda")
    batch = 1 if dry else BATCH
    argv = ["--align", "ot", "--layers", "0", "1", "--per-device-batch-size", str(batch), "--dtype", "bfloat16",
            "--no-decode", "--steps", "3" if dry else "5"]  # the first allocates AdamW's state, the second measures
    argv += ["--audio-seconds", "1"] if dry else []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if dry:
            ck = tiny.write_tiny_checkpoints(tmp, "qwen2")
            args = gpu_plan.parser().parse_args(argv + ["--whisper", ck["whisper"], "--beats", ck["beats"],
                                                        "--llm", ck["llm"], *TINY_QFORMER])
        else:
            args = gpu_plan.parser().parse_args(argv)
            args.__dict__.update(gpu_plan.real_config_folder("qwen2-7b", tmp), no_beats=False)
        args.grad_accum = 1
        t = time.time()
        m, objective = gpu_plan.measure_step(args, device, None, batch)
        seconds = time.time() - t
    res = dict(model="tiny (dry run)" if dry else "qwen2-7b + whisper-large-v2 + beats-cpt2, random weights",
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", batch=batch,
               llm_layers=m["llm_layers"], seq_len=m["seq_len"], loss=m["loss"], step_s=m["step_s"],
               first_step_s=m["first_step_s"], build_and_steps_s=round(seconds, 1),
               peak_above_weights_and_adam_gib=m["peak_bytes"] / 2 ** 30, tflop_per_step=m["flops"] / 1e12,
               memory_method=m["method"])
    if device.type == "cuda":  # measure_step reset the peak before its second step: the steady state from there
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        res["tflop_per_s"] = m["flops"] / m["step_s"] / 1e12 if m["step_s"] else None
    Path(path).write_text(json.dumps(res))


def main(argv=None):
    args = parser().parse_args(argv)
    if args.stage3_step:
        return stage3_step(args.stage3_step, args.dry_run)
    with tempfile.TemporaryDirectory(prefix="aista_site_") as site:
        return check(args, site)


def check(args, site):
    import torch
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # what an earlier run left must not pass for this run's results
        (out / name).unlink(missing_ok=True)
    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    result = dict(dry=dry, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  python=sys.version.split()[0])
    if dry:
        print("dry run" + ("" if cuda else " (no CUDA device)") + ": every step on the CPU at small sizes; the CUDA "
              "parts (the tests' GPU runs, the GPU timings, the full-size step) are skipped", flush=True)
    installed, result["wheels"] = install_wheels(args.wheels, site, out / "wheels.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    if any(s != "installed" for s in result["wheels"].values()):
        print(f"not installed (wheels from {args.wheels}): {result['wheels']} (see this file's docstring)", flush=True)
    py = sys.executable
    xml = out / "pytest_cuda.xml"
    result["tests"] = run_step("tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                         f"--junitxml={xml}", "tests/test_cuda.py"], out, env, LIMITS["tests"])
    result["tests"].update(junit_counts(xml))
    bench = [py, "benchmarks/bench_ot.py", "--only-gpu-shapes", "--json", str(out / "bench_ot.json")]
    bench += ["--quick"] if dry else ["--device", "cuda"]
    result["bench"] = run_step("bench", bench, out, env, LIMITS["bench"])
    if (out / "bench_ot.json").is_file():
        result["bench"].update(json.loads((out / "bench_ot.json").read_text())["gpu shapes"])
    step = [py, "benchmarks/gpu_check.py", "--stage3-step", str(out / "step.json")] + (["--dry-run"] if dry else [])
    result["step"] = run_step("step", step, out, env, LIMITS["step"])
    if (out / "step.json").is_file():
        result["step"].update(json.loads((out / "step.json").read_text()))
    result["plan_row_gib"] = plan = plan_row()
    if plan and result["step"].get("peak_allocated_gib"):  # the planned figure is for 30-s clips, 64 target tokens
        result["step"]["measured_over_planned"] = result["step"]["peak_allocated_gib"] / plan[f"B={BATCH}"]
    result["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(result)
    (out / "gpu_check.json").write_text(line + "\n")
    print(line)
    ok = all(result[s].get("rc") == 0 for s in ("tests", "bench", "step"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
