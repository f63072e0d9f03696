"""Benchmark ot.py against GeomLoss and POT on the shapes AI-STA uses.

    python benchmarks/bench_ot.py              # full tables (a few minutes on 2 CPU cores)
    python benchmarks/bench_ot.py --quick      # smaller batches, for a smoke run

Every contender gets the same inputs in one process; the table gives the time of one forward (+ backward
where the contender offers gradients), the mean relative error of the value against POT's exact `ot.emd2`
(float64), and peak memory: the growth of the resident set of a fresh subprocess that runs only that
contender (Linux). Everything runs on the CPU; set OMP_NUM_THREADS to pin the thread count.

Name clash: run as a script, this folder is first on sys.path, so `import ot` is POT; the project's ot.py
is loaded by path as `aista_ot`.
"""
import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("aista_ot", ROOT / "ot.py")
aista_ot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aista_ot)


def hidden_states(B, n, m, d, seed):
    """Speech-window and text-token states with a shared offset and partly matching content, as after
    stage 1: the text side is a noisy, shorter re-ordering-free subsample of the speech side."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, 1, d, generator=g) * 2.0
    x = offset + torch.randn(B, n, d, generator=g)
    idx = torch.sort(torch.randint(0, n, (B, m), generator=g), dim=1).values
    y = torch.gather(x, 1, idx[..., None].expand(B, m, d)) + 0.5 * torch.randn(B, m, d, generator=g)
    return x, y


def exact_w(x, y):
    import ot as pot
    out = []
    for xb, yb in zip(x.double().numpy(), y.double().numpy()):
        M = pot.dist(xb, yb)
        out.append(pot.emd2(np.full(len(xb), 1 / len(xb)), np.full(len(yb), 1 / len(yb)), M, numItermax=10_000_000))
    return np.array(out)


# ---------------------------------------------------------------- contenders: (x, y) -> values (B,)
def ours(dtype, n_iters=aista_ot.N_ITERS):
    def run(x, y):
        xg = x.detach().to(dtype, copy=True).requires_grad_(True)
        v = aista_ot.wasserstein(xg, y.to(dtype), n_iters=n_iters)
        v.sum().backward()
        return v.detach().double()
    return run


def geomloss(blur, scaling):
    from geomloss import SamplesLoss
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False, backend="tensorized")

    def run(x, y):
        xg = x.clone().requires_grad_(True)
        v = 2.0 * loss(xg, y)          # GeomLoss's cost is |x - y|^2 / 2
        v.sum().backward()
        return v.detach().double()
    return run


def pot_reg(x, y):
    """The absolute epsilon ours uses for each problem, so POT solves the same entropic problems."""
    cost = aista_ot.cost_matrix(x.double(), y.double())
    valid = torch.ones_like(cost, dtype=torch.bool)
    return (aista_ot.EPS * aista_ot._scale(cost, valid)[0]).numpy(), cost


def pot_solve_batch(x, y):
    import ot as pot
    reg, cost = pot_reg(x, y)
    # one reg for the batch (solve_batch takes a scalar): the median of the per-problem values
    res = pot.solve_batch(cost.float(), reg=float(np.median(reg)), max_iter=aista_ot.N_ITERS, tol=1e-5,
                          method="log_sinkhorn")
    return torch.as_tensor(res.value_linear).double()


def pot_loop(x, y):
    import ot as pot
    reg, cost = pot_reg(x, y)
    out = []
    for c, r in zip(cost.float().numpy(), reg):
        a, b = np.full(c.shape[0], 1 / c.shape[0], dtype=np.float32), np.full(c.shape[1], 1 / c.shape[1], dtype=np.float32)
        plan = pot.sinkhorn(a, b, c, reg=float(r), method="sinkhorn_log")
        out.append(float((plan * c).sum()))
    return torch.tensor(out, dtype=torch.float64)


def ours_pairwise(dtype):
    def run(x, y):
        return aista_ot.pairwise_wasserstein(x.to(dtype), y.to(dtype), chunk_size=4096).double()
    return run


# ---------------------------------------------------------------- measurement
def timed(fn, *args, repeat=3):
    fn(*args)  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_memory_mb(case, contender, quick):
    """Peak RSS growth (MB) of a subprocess that builds the inputs, then runs one contender once."""
    cmd = [sys.executable, __file__, "--memory-probe", case, contender] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def contenders(case, quick=False):
    if case.startswith("retrieval"):
        return {"ours fp32": ours_pairwise(torch.float32), "ours bf16": ours_pairwise(torch.bfloat16)}
    # GeomLoss on ours' entropic problem: its eps = blur^2 on its |x-y|^2 / 2 scale = ours' eps_abs / 2
    # (the median over the batch: GeomLoss takes one blur)
    x, y = inputs(case, quick)
    reg, _ = pot_reg(x, y)
    same = round(float(np.sqrt(np.median(reg) / 2)), 3)
    grid = GEOMLOSS_GRID + [(same, s) for s in (0.5, 0.7, 0.9)]
    return {"ours fp32": ours(torch.float32), "ours bf16": ours(torch.bfloat16),
            "ours fp32 n_iters=50": ours(torch.float32, 50), "ours fp32 n_iters=20": ours(torch.float32, 20),
            "POT solve_batch": pot_solve_batch, "POT sinkhorn_log loop": pot_loop,
            **{f"GeomLoss blur={b} scaling={s}" + (" (ours' eps)" if b == same else ""): geomloss(b, s)
               for b, s in grid}}


GEOMLOSS_GRID = [(0.5, 0.5), (0.2, 0.5), (0.2, 0.7), (0.1, 0.7), (0.1, 0.9)]


def per_iteration(x, y, repeat=3):
    """(seconds per solver iteration of ours, the two-pass limit): the difference of 300 and 150 iterations
    over 150, against two passes of exp + sum over the (B, n, m) cost (one per half-iteration)."""
    t150, _ = timed(ours(torch.float32, 150), x, y, repeat=repeat)
    t300, _ = timed(ours(torch.float32, 300), x, y, repeat=repeat)
    cost = aista_ot.cost_matrix(x, y)
    limit, _ = timed(lambda c: c.exp().sum(2), cost, repeat=20)
    return (t300 - t150) / 150, 2 * limit


def cases(quick):
    B = 8 if quick else 32
    N = 40 if quick else 200
    return {"loss d=896": (B, 88, 40, 896), "loss d=3584": (B, 88, 40, 3584), "retrieval d=896": (N, 30, 20, 896)}


def inputs(case, quick):
    B, n, m, d = cases(quick)[case]
    if case.startswith("retrieval"):
        x, _ = hidden_states(B, n, m, d, seed=1)
        _, y = hidden_states(B, n, m, d, seed=1)
        return x, y
    return hidden_states(B, n, m, d, seed=0)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(case, contender, quick):
    """Peak resident-set growth while `contender` runs once, sampled every 0.5 ms by a thread (Linux)."""
    x, y = inputs(case, quick)
    fn = {**contenders(case, quick), "ours fp32 n_iters=50": ours(torch.float32, 50),
          "ours fp32 n_iters=500": ours(torch.float32, 500)}[contender]
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    fn(x, y)
    done.set()
    thread.join()
    print(max(peak[0], rss_mb()) - base)


# ---------------------------------------------------------------- stage 3: OT on five layers vs cross-entropy only
def demo_model(folder, seed=0):
    """The CPU demo's stage-3 model with random weights (demo.sh MODEL, demo/backbones.py): Qwen2 LLM hidden 128 x 4
    layers (float32, LoRA), Whisper d96 x 2 layers with the demo's cut input (4 s: its clips are under 4 s), tiny
    BEATs, Q-Former hidden 128 / 4 heads / FFN 256 x 2 layers, --speech-tokens real. -> (lsm, sentences)."""
    import json as _json
    import os
    sys.path.insert(0, str(ROOT))
    import beats as beats_lib
    import model as M
    from demo import backbones, corpus
    from transformers import WhisperFeatureExtractor, WhisperModel
    sentences = corpus.sample_sentences(600, seed)
    tok = backbones.train_tokenizer([s for t in sentences for s in t] + backbones.prompt_texts() * 50)
    torch.manual_seed(seed)
    llm, whisper = os.path.join(folder, "llm"), os.path.join(folder, "whisper")
    backbones.save_lm(backbones.new_lm(tok, hidden=128, layers=4, seed=seed), tok, llm)
    cfg = backbones.whisper_config()
    WhisperModel(cfg).save_pretrained(whisper)
    seconds = 4                              # demo/backbones.py short_whisper: ceil(longest clip + 17 frames)
    with open(os.path.join(whisper, "config.json")) as f:
        c = _json.load(f)
    from safetensors.torch import load_file, save_file
    w = load_file(os.path.join(whisper, "model.safetensors"))
    w["encoder.embed_positions.weight"] = w["encoder.embed_positions.weight"][:50 * seconds].contiguous()
    save_file(w, os.path.join(whisper, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(whisper, "config.json"), "w") as f:
        _json.dump({**c, "max_source_positions": 50 * seconds}, f)
    WhisperFeatureExtractor(feature_size=80, chunk_length=seconds).save_pretrained(whisper)
    beats = beats_lib.write_tiny_beats(os.path.join(folder, "beats", beats_lib.BEATS_CKPT_NAME), seed=seed)
    lsm = M.LSM(whisper, llm, beats, llm_dtype="float32", speech_tokens="real", qformer_layers=2,
                qformer_hidden=128, qformer_heads=4, qformer_ffn=256, verbose=False)
    return lsm, sentences


def demo_batch(lsm, sentences, B=16, seed=0):
    """B demo-like items: the corpus grammar's sentences (English transcript, Chinese target), noise clips of
    ~0.3 s per word + 0.5 s (espeak's pace in the demo corpus, under 4 s), collated as data.Collator does."""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"])
    rng = np.random.default_rng(seed)
    pick = [sentences[i] for i in rng.choice(len(sentences), B, replace=False)]
    secs = [min(3.6, 0.5 + 0.3 * len(en.split()) + rng.uniform(0, 0.4)) for en, _, _ in pick]
    wavs = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in secs]
    mel = torch.from_numpy(fe(wavs, sampling_rate=16000, return_tensors="np").input_features)
    wav = torch.zeros(B, max(len(w) for w in wavs))
    for i, w in enumerate(wavs):
        wav[i, :len(w)] = torch.from_numpy(w)
    return dict(ids=[f"utt{i}" for i in range(B)], mel=mel, wav=wav, wav_lens=torch.tensor([len(w) for w in wavs]),
                instructions=["Translate the speech into Chinese."] * B, targets=[zh for _, zh, _ in pick],
                transcripts=[en for en, _, _ in pick], tasks=["st"] * B, tgt_langs=["zh"] * B)


def stage3_step(rounds=15, B=16):
    """Seconds of one stage-3 training step (forward, backward, AdamW step) of the demo model with --align ot on
    layers 0-4 against --align none (cross-entropy only), alternating on one batch; and what the difference is
    made of: the text forward (LSM.text_forward on layers 0-4, no gradient), ot.wasserstein forward + backward on
    the step's shapes, and the speech forward's extra hidden-state capture."""
    import tempfile
    sys.path.insert(0, str(ROOT))
    import joint_train
    with tempfile.TemporaryDirectory() as folder:
        lsm, sentences = demo_model(folder)
        batch = demo_batch(lsm, sentences, B)
        layers = (0, 1, 2, 3, 4)
        objectives = {"none": joint_train.AlignedObjective(lsm, "none").train(),
                      "ot": joint_train.AlignedObjective(lsm, "ot", layers=layers).train()}
        params = [p for p in lsm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(obj):
            opt.zero_grad(set_to_none=True)
            obj(batch)["loss"].backward()
            opt.step()

        def text():
            lsm.text_forward(batch["transcripts"], batch["instructions"], layers)

        def speech(layers):
            def run():
                out = lsm.speech_forward(batch, layers)
                out["loss"].backward()
            return run

        out = lsm.speech_forward(batch, layers)
        hidden, text_states = lsm.text_forward(batch["transcripts"], batch["instructions"], layers)
        mask = out["speech_mask"]
        n = int(mask.sum(1).max())
        x0 = torch.cat([out["hidden"][l][:, :n].detach() for l in layers])
        y0 = torch.cat([hidden[l] for l in layers])
        xm, ym = mask[:, :n].repeat(len(layers), 1), text_states.repeat(len(layers), 1)

        def sinkhorn():
            x = x0.clone().requires_grad_(True)
            aista_ot.wasserstein(x, y0, xm, ym).sum().backward()

        parts = {"step none": lambda: step(objectives["none"]), "step ot": lambda: step(objectives["ot"]),
                 "text forward": text, "ot.wasserstein": sinkhorn,
                 "speech fwd+bwd, no layers": speech(()), "speech fwd+bwd, layers 0-4": speech(layers)}
        times = {k: [] for k in parts}
        for fn in parts.values():
            fn()  # warm-up
        for _ in range(rounds):     # interleaved, so the load of a shared machine hits every part alike
            for k, fn in parts.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) for k, v in times.items()}
        med["shapes"] = dict(problems=int(x0.shape[0]), n=int(n), m=int(ym.shape[1]), d=int(x0.shape[2]),
                             speech_windows=mask.sum(1).tolist(), text_tokens=ym[:B].sum(1).tolist())
        return med


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batches")
    p.add_argument("--memory-probe", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--only-stage3", action="store_true", help="only the stage-3 step ratio (demo-sized model)")
    args = p.parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ot.py defaults eps={aista_ot.EPS} "
          f"n_iters={aista_ot.N_ITERS}")
    results = {}
    for case in ([] if args.only_stage3 else cases(args.quick)):
        x, y = inputs(case, args.quick)
        if case.startswith("retrieval"):   # exact distances of a 20 x 20 corner, the all-pairs block timed whole
            xs, ys = x[:20], y[:20]
            truth = np.array([exact_w(xs[i:i + 1].expand(20, -1, -1), ys) for i in range(20)])
        else:
            truth = exact_w(x, y)
        rows = []
        for name, fn in contenders(case, args.quick).items():
            seconds, values = timed(fn, x, y, repeat=1 if "loop" in name or case.startswith("retrieval") else 3)
            if case.startswith("retrieval"):
                values = values[:20, :20].numpy()
            values = values.numpy() if torch.is_tensor(values) else values
            err = float(np.mean(np.abs(values / truth - 1)))
            rows.append({"contender": name, "seconds": seconds, "error": err,
                         "peak_mb": peak_memory_mb(case, name, args.quick)})
        ref = rows[0]["seconds"]
        print(f"\n{case}: x {tuple(x.shape)}, y {tuple(y.shape)}")
        print("| contender | time (s) | time / ours fp32 | mean rel. error vs emd2 | peak MB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['contender']} | {r['seconds']:.4f} | {r['seconds'] / ref:.2f} | {r['error']:.4f} | {r['peak_mb']:.0f} |")
        results[case] = rows
        if not case.startswith("retrieval"):
            mine = rows[0]
            geo = [r for r in rows if r["contender"].startswith("GeomLoss")]
            as_good = [r for r in geo if r["error"] <= mine["error"]]
            fastest = min(geo, key=lambda r: r["seconds"])
            print(f"ours fp32 (error {mine['error']:.2e}) vs GeomLoss: " + ", ".join(
                f"{r['contender'][9:]} {r['seconds'] / mine['seconds']:.2f}x slower at {r['error'] / max(mine['error'], 1e-12):.0f}x the error"
                for r in geo))
            print(f"  fastest GeomLoss setting: {fastest['seconds'] / mine['seconds']:.2f}x ours' time; "
                  + (f"fastest at no worse error: {min(r['seconds'] for r in as_good) / mine['seconds']:.2f}x" if as_good
                     else "no GeomLoss setting reaches ours' error"))
            it, limit = per_iteration(x, y)
            print(f"  time per iteration: ours {it * 1e3:.3f} ms, two-pass limit (2 x exp + sum over B x n x m) "
                  f"{limit * 1e3:.3f} ms: {it / limit:.2f}x the limit")
            results[case + " per_iteration"] = dict(ours=it, limit=limit)
            cost = aista_ot.cost_matrix(x, y)
            plan = aista_ot.sinkhorn(cost).log_plan_row.exp()
            col_err = (plan.sum(1) - 1 / y.shape[1]).abs().sum(1)
            print(f"  L1 column-marginal error at the defaults: max {col_err.max():.1e} (TOL {aista_ot.TOL:g}); "
                  f"rows exact")
            results[case + " marginal_error"] = float(col_err.max())
    if not args.only_stage3:
        case = "loss d=896"
        mem = {k: peak_memory_mb(case, f"ours fp32 n_iters={k}", args.quick) for k in (50, 500)}
        print(f"\npeak memory of one forward+backward, {case}: n_iters=50: {mem[50]:.0f} MB, n_iters=500: "
              f"{mem[500]:.0f} MB")
        results["memory_vs_iters"] = mem
    if "ot" in sys.modules and not hasattr(sys.modules["ot"], "EPS"):
        # POT was imported as `ot` above; the stage-3 step imports the project's modules, whose `import ot` must
        # be ot.py: measure it in a fresh process that never imports POT
        with tempfile.TemporaryDirectory() as folder:
            part = Path(folder) / "stage3.json"
            proc = subprocess.run([sys.executable, __file__, "--only-stage3", "--json", str(part)]
                                  + (["--quick"] if args.quick else []), capture_output=True, text=True)
            print(proc.stdout, end="")
            if proc.returncode != 0:
                raise SystemExit(f"the stage-3 measurement failed:\n{proc.stderr[-2000:]}")
            results["stage3"] = json.loads(part.read_text())["stage3"]
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    st = stage3_step(rounds=5 if args.quick else 15)
    shapes = st.pop("shapes")
    print(f"\nstage-3 step, demo-sized model, batch 16, {torch.get_num_threads()} thread(s), median of interleaved "
          f"rounds: OT problems {shapes['problems']} x ({shapes['n']} x {shapes['m']}) d={shapes['d']}")
    print("| part | seconds |\n|---|---|")
    for k, v in st.items():
        print(f"| {k} | {v:.4f} |")
    extra = st["step ot"] - st["step none"]
    print(f"step ratio ot / none: {st['step ot'] / st['step none']:.3f} (target <= 1.15); extra {extra * 1e3:.1f} ms = "
          f"text forward {st['text forward'] * 1e3:.1f} + ot.wasserstein {st['ot.wasserstein'] * 1e3:.1f} + hidden "
          f"capture {(st['speech fwd+bwd, layers 0-4'] - st['speech fwd+bwd, no layers']) * 1e3:.1f} ms (+ rest)")
    results["stage3"] = dict(st, shapes=shapes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
