"""Peak host memory of one rank's model build on the CPU, at the real widths (random weights, tiny.py's writers).

    python benchmarks/bench_build_memory.py --folder /tmp/real --llm qwen2-7b --layers 2

Each measurement runs in a fresh process that samples /proc/self/status every 5 ms: peak resident memory (VmHWM)
and peak anonymous memory (RssAnon: what the process itself allocated, as opposed to file pages of memory-mapped
safetensors, which the page cache shares between the ranks of a node). Printed per build, as JSON lines:
  whisper-full     WhisperModel.from_pretrained(...).encoder (the whole model, then its encoder: the old LSM code)
  whisper-encoder  model.WhisperEncoderOnly.load (what LSM builds now: the decoder is never read)
  lsm              model.LSM(whisper, llm, beats) with a bf16 LLM, then every weight touched once (a first forward)
Numbers depend on the machine and on what else runs: re-measure on a quiet one.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(build):
    """Run build() while sampling memory -> dict of peaks (bytes) and seconds."""
    peak, stop = {"RssAnon": 0}, threading.Event()

    def sample():
        while not stop.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _status()["RssAnon"])
            time.sleep(0.005)
    start, t0 = _status(), time.time()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    build()
    stop.set()
    thread.join()
    end = _status()
    return dict(seconds=round(time.time() - t0, 1), peak_rss_gb=round(end["VmHWM"] / 1e9, 2),
                peak_anon_gb=round(max(peak["RssAnon"], end["RssAnon"]) / 1e9, 2),
                anon_before_gb=round(start["RssAnon"] / 1e9, 2), file_pages_after_gb=round(end["RssFile"] / 1e9, 2))


def child(what, paths):
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    import model as M
    keep = []

    def touch(module):  # a first forward reads every weight: read one element per 1-2 KB, i.e. every 4 KB page
        with torch.no_grad():
            for p in module.parameters():
                p.reshape(-1)[::512].float().sum()
        keep.append(module)

    if what == "whisper-full":
        from transformers import WhisperModel
        build = lambda: touch(WhisperModel.from_pretrained(paths["whisper"], dtype=torch.float32).encoder)
    elif what == "whisper-encoder":
        build = lambda: touch(M.WhisperEncoderOnly.load(paths["whisper"], torch.device("cpu")))
    else:
        build = lambda: touch(M.LSM(paths["whisper"], paths["llm"], paths["beats"], llm_dtype="bfloat16",
                                    verbose=False))
    print(json.dumps(dict(build=what, **measure(build))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="where the real-width checkpoints are written (or reused)")
    p.add_argument("--llm", default="qwen2-7b", choices=["qwen2-7b", "vicuna-13b"])
    p.add_argument("--layers", type=int, default=2, help="layers of every component (tiny.write_real_checkpoints)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, json.loads(a.paths))
    sys.path.insert(0, ROOT)
    import tiny
    paths = tiny.write_real_checkpoints(os.path.join(a.folder, f"{a.llm}-{a.layers}"), a.llm, layers=a.layers)
    sizes = {k: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(v) for f in fs if
                    f.endswith((".safetensors", ".pt"))) if os.path.isdir(v) else os.path.getsize(v)
             for k, v in paths.items()}
    print(json.dumps(dict(llm=a.llm, layers=a.layers, checkpoint_gb={k: round(v / 1e9, 2) for k, v in sizes.items()})))
    for what in ("whisper-full", "whisper-encoder", "lsm"):
        subprocess.run([sys.executable, __file__, "--folder", a.folder, "--child", what, "--paths", json.dumps(paths)],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
