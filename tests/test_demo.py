"""The CPU demo end to end, reduced (`QUICK=1 bash demo.sh`: a few hundred utterances, tens of steps): every
stage runs from a fresh output folder and leaves outputs that are there and sane. One run (~3 min on 2 cores)
serves all the tests of this file; the checks are on values, not on "it ran"."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `QUICK=1 bash demo.sh` into a fresh OUT; -> (OUT, stdout). Fails with the log tail if it fails."""
    out = tmp_path_factory.mktemp("demo_out")
    env = dict(os.environ, QUICK="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("CORPUS", None), env.pop("BACKBONES", None)  # build everything, as on a fresh clone
    proc = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"demo.sh failed ({proc.returncode}):\n{log[-6000:]}"
    return str(out), proc.stdout


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finite_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_corpus_and_backbones(demo):
    out, _ = demo
    corpus = os.path.join(out, "corpus")
    for name in ("asr_train", "aac_train", "retrieval", "st_zh_train", "st_zh_dev", "st_zh_test", "st_ja_test"):
        rows = read_jsonl(os.path.join(corpus, f"{name}.jsonl"))
        assert rows, name
        assert all(os.path.exists(os.path.join(corpus, r["audio"])) for r in rows), name
    src = {name: {r["text"] for r in read_jsonl(os.path.join(corpus, f"{name}.jsonl"))}
           for name in ("st_zh_test", "st_zh_dev", "st_zh_train", "retrieval")}
    for a in src:  # no sentence in two splits: stage 2 chooses layers on sentences no other stage sees
        assert all(a == b or not src[a] & src[b] for b in src), a
    bb = os.path.join(out, "backbones")
    with open(os.path.join(bb, "backbones.json")) as f:
        info = json.load(f)
    assert os.path.exists(os.path.join(bb, "beats", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"))
    for part in ("whisper", "llm"):
        assert os.path.exists(os.path.join(bb, part, "config.json")), part
        assert os.path.exists(os.path.join(bb, part, "model.safetensors")), part
    assert info["llm"]["dev_loss_final"] < info["llm"]["dev_loss_init"]  # the LM learned something
    # the demo's Whisper input: the backbone's weights with a short input that still holds the longest clip
    short = os.path.join(out, "whisper_short")
    with open(os.path.join(short, "config.json")) as f:
        positions = json.load(f)["max_source_positions"]
    with open(os.path.join(short, "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert pre["n_samples"] == 320 * positions == 16000 * pre["chunk_length"] and pre["nb_max_frames"] == 2 * positions
    import soundfile as sf
    longest = max(sf.info(os.path.join(corpus, r["audio"])).duration
                  for name in ("asr_train", "aac_train", "st_zh_test") for r in read_jsonl(os.path.join(corpus, f"{name}.jsonl")))
    assert longest + 17 / 50 <= pre["chunk_length"] < 30
    from safetensors import safe_open
    with safe_open(os.path.join(short, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(bb, "whisper", "model.safetensors"), "pt") as g:
        pos, full = f.get_tensor("encoder.embed_positions.weight"), g.get_tensor("encoder.embed_positions.weight")
        assert pos.shape[0] == positions and (pos == full[:positions]).all()
        assert (f.get_tensor("encoder.layers.0.fc1.weight") == g.get_tensor("encoder.layers.0.fc1.weight")).all()


@pytest.mark.parametrize("run", ["stage1", "stage3_base", "stage3_aista"])
def test_training_losses_finite(demo, run):
    out, _ = demo
    rows = read_jsonl(os.path.join(out, run, "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r and r.get("split") != "dev"]
    assert len(train_rows) >= 2, rows
    for r in train_rows:
        assert finite_number(r["loss"]) and finite_number(r["ce"]), r  # non-finite values are logged as null
        assert r["loss"] > 0
    if run == "stage1":  # a fresh connector: the cross-entropy falls (stage 3's few steps are noise)
        assert train_rows[-1]["ce"] < train_rows[0]["ce"], train_rows
    assert os.path.exists(os.path.join(out, run, "last.safetensors"))
    if run.startswith("stage3"):
        dev = [r for r in rows if r.get("split") == "dev"]
        assert dev and all(finite_number(r["loss"]) and 0 <= r["acc"] <= 1 for r in dev), dev
        assert os.path.exists(os.path.join(out, run, "best.safetensors"))
    if run == "stage3_aista":  # eq. 6: a Wasserstein term per selected layer, finite and non-negative
        with open(os.path.join(out, "stage2", "layers.json")) as f:
            selected = json.load(f)["selected"] or [0]
        for r in train_rows:
            for l in selected:
                assert finite_number(r[f"w_{l}"]) and r[f"w_{l}"] >= 0, r
                assert r["loss"] > 0.99 * r["ce"]
    if run == "stage3_base":
        assert not any(k.startswith("w_") for r in train_rows for k in r)


def test_stage2_layers(demo):
    out, _ = demo
    with open(os.path.join(out, "stage2", "layers.json")) as f:
        d = json.load(f)
    mrr = {int(l): v for l, v in d["mrr"].items()}
    with open(os.path.join(out, "backbones", "llm", "config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    assert sorted(mrr) == list(range(n_layers + 1))  # layer 0 (embeddings) .. L
    n = d["num_pairs"]
    for l, v in mrr.items():
        assert finite_number(v) and 1 / n <= v <= 1, (l, v)  # a rank is at most N
    assert d["selected"] == [l for l in sorted(mrr) if mrr[l] > d["threshold"]]


@pytest.mark.parametrize("run", ["eval_base", "eval_aista"])
def test_evaluation_metrics(demo, run):
    out, _ = demo
    with open(os.path.join(out, run, "metrics.json")) as f:
        m = json.load(f)
    for mode in ("st", "mt"):
        s = m["bleu"][mode]["zh"]
        assert finite_number(s["score"]) and 0 <= s["score"] <= 100, s
        assert "tok:zh" in s["signature"]
        hyps = read_jsonl(os.path.join(out, run, f"hyps.{mode}.jsonl"))
        assert len(hyps) == m["n"] == s["n"]
        assert all(h["reference"] for h in hyps)
    with open(os.path.join(out, "stage2", "layers.json")) as f:
        selected = json.load(f)["selected"] or [0]
    a = m["alignment"]
    assert [int(l) for l in a["log_w"]] == selected
    assert all(finite_number(v) for v in a["log_w"].values())
    assert finite_number(a["mean"]) and finite_number(a["mismatched_mean"])
    for mode in ("st", "mt"):  # chrF beside BLEU; AI-STA's paired bootstrap against the base run's hypotheses
        s = m["bleu"][mode]["zh"]
        assert finite_number(s["chrf"]) and 0 <= s["chrf"] <= 100 and "nc:6|nw:0" in s["chrf_signature"]
        if run == "eval_aista":
            bs = s["paired_bs"]
            with open(os.path.join(out, "eval_base", "metrics.json")) as f:
                base = json.load(f)["bleu"][mode]["zh"]
            assert bs["baseline_sha256"] == base["sha256"] and bs["baseline"]["bleu"]["score"] == base["score"]
            assert bs["bleu"]["score"] == s["score"] and bs["n_samples"] == 1000 and bs["seed"] == 12345
            assert 1 / 1001 <= bs["bleu"]["p"] <= 1 and 1 / 1001 <= bs["chrf"]["p"] <= 1
    assert m["train"]["seed"] == 0


def test_figures_are_pngs(demo):
    out, _ = demo
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    import results
    shapes = {}
    for name in ("fig4_mrr_per_layer.png", "fig5_tsne.png", "fig6_bleu_vs_alignment.png",
                 os.path.join("stage2", "mrr_per_layer.png")):
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, name
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)
        assert img.std() > 0  # not a blank canvas
        shapes[name] = img.shape[:2]
    # Figure 5: two panels side by side (base | AI-STA)
    assert shapes["fig5_tsne.png"] == (results.FIG_INCHES[1] * results.FIG_DPI,
                                      2 * results.FIG_INCHES[0] * results.FIG_DPI)
    with open(os.path.join(out, "eval_aista", "metrics.json")) as f:
        assert json.load(f)["tsne"]["panels"] == ["base (CE only)", "AI-STA (OT, selected layers "
                                                  + " ".join(map(str, _selected(out))) + ")"]


def _selected(out):
    with open(os.path.join(out, "stage2", "layers.json")) as f:
        return json.load(f)["selected"] or [0]


def test_printed_commands_and_table(demo):
    out, stdout = demo
    for script in ("demo/corpus.py", "demo/backbones.py", "pretrain.py", "select_layers.py", "joint_train.py",
                   "evaluate.py"):
        assert re.search(rf"^\+ \S*python\S* {re.escape(script)}", stdout, re.M), f"{script} not shown"
    assert "--align none" in stdout and "--align ot" in stdout
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    assert rows[0][:6] == ["Model", "ST zh", "ST zh chrF", "ST zh p", "MT zh", "MT zh chrF"], rows[0]
    assert rows[1][0] == "base (CE only)" and rows[2][0].startswith("AI-STA")
    for row in rows[1:]:
        assert finite_number(float(row[1])) and finite_number(float(row[2])), row
    # AI-STA's p-value against the base run (seed 0), as its metrics.json holds it
    with open(os.path.join(out, "eval_aista", "metrics.json")) as f:
        p = json.load(f)["bleu"]["st"]["zh"]["paired_bs"]["bleu"]["p"]
    assert rows[1][3] == "" and rows[2][3] == f"{p:.3f}"
    assert table in stdout
    assert "| Layer | MRR | selected |" in stdout  # Figure 4 as a table (evaluate.py --mrr)
    with open(os.path.join(out, "timing.txt")) as f:
        timing = f.read()
    assert re.search(r"total\s+\d+ s", timing)
    for key in ("base", "aista"):  # the two stage-3 runs went side by side, each with its log
        assert re.search(rf"stage 3: {key}, seed 0\s+\d+ s", timing) and f"[stage 3: {key}, seed 0]" in stdout
        with open(os.path.join(out, "logs", f"{key}_seed0.log")) as f:
            assert "done at step" in f.read()  # joint_train.py's last line


def test_no_program_text_in_demo_sh():
    """demo.sh runs the project's scripts; its only Python snippets are import checks (the install guard)."""
    with open(os.path.join(ROOT, "demo.sh")) as f:
        text = f.read()
    assert "<<" not in text  # no heredoc
    variables = dict(re.findall(r"^(\w+)=\"([^\"]*)\"$", text, re.M))
    snippets = [variables.get(s[1:], s) if s.startswith("$") else s for s in re.findall(r"\$PY -c \"([^\"]*)\"", text)]
    assert snippets and all(s.startswith("import ") for s in snippets), snippets
    assert len(re.findall(r"\$PY -c", text)) == len(snippets)



FAKE_PYTHON = """#!/usr/bin/env bash
# python for demo.sh's install step: a snippet that imports torch runs against a fake torch package, pip and
# the other import checks only record their call, and the first stage (the corpus) ends the demo with rc 3
echo "$*" >> "$CALLS"
case "$1 $2" in
    "-c "*torch*) PYTHONPATH="$FAKE_TORCH_DIR" exec "$REAL_PYTHON" "$@" ;;
    "-m pip" | "-c "*) ;;
    *) exit 3 ;;
esac
"""


@pytest.mark.parametrize("torch_version, pip_torch", [("2.13.0+cpu", False), ("2.3.1+cu121", False),
                                                      ("2.5.0a0+git1234", False), (None, True)])
def test_install_keeps_any_supported_torch(tmp_path, torch_version, pip_torch):
    """demo.sh installs torch only when none is importable (then the range of requirements.txt), and uses any
    torch in that range as it is: a lab node's CUDA build is not replaced."""
    calls, _ = _run_install_step(tmp_path, torch_version)
    pips = [c for c in calls if c.startswith("-m pip")]
    assert pips == (["-m pip install -q torch>=2.3,<3"] if pip_torch else []), calls
    assert any("corpus.py" in c for c in calls)  # went on to the corpus


@pytest.mark.parametrize("torch_version", ["2.1.2+cu118", "1.13.1", "3.0.0"])
def test_install_refuses_torch_outside_the_range(tmp_path, torch_version):
    calls, proc = _run_install_step(tmp_path, torch_version, rc=1)
    assert not any(c.startswith("-m pip") for c in calls), calls
    assert f"torch {torch_version} is installed" in proc.stderr and "torch>=2.3,<3" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no trace


def _run_install_step(tmp_path, torch_version, rc=3):
    """demo.sh with FAKE_PYTHON as its python and a fake torch of this version (None: import torch fails)
    -> (the python calls it made, the process)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(
        f"__version__ = {torch_version!r}" if torch_version else "raise ImportError('no torch here')")
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_TORCH_DIR=str(tmp_path / "fake"),
               OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls"))
    env.pop("CORPUS", None), env.pop("BACKBONES", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return (tmp_path / "calls").read_text().splitlines(), proc


FAKE_PIPELINE = """#!/usr/bin/env bash
# python for demo.sh with every stage faked: each writes the output demo.sh looks for; joint_train.py and evaluate.py
# log when they start and end (and joint_train.py sleeps, or fails for the run named in $FAKE_FAIL)
echo "$*" >> "$CALLS"
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --output-dir ]] && out=${args[i + 1]}; done
stamp() { echo "$1 $2 $(basename "$out") $(date +%s.%N)" >> "$EVENTS"; }
case "$1 $2" in
    "-c import torch; print(torch.__version__)") echo 2.13.0 ;;
    "-c "*) ;;
    "demo/backbones.py --layers") [[ $4 == all ]] && echo 0 1 2 || echo 0 1 ;;
    "demo/backbones.py --corpus") [[ $6 == --short-whisper ]] && mkdir -p "$7" || { mkdir -p "$5"; touch "$5/backbones.json"; } ;;
    pretrain.py*) mkdir -p "$out"; touch "$out/last.safetensors" ;;
    select_layers.py*) mkdir -p "$out"; touch "$out/layers.json" "$out/mrr_per_layer.png" ;;
    joint_train.py*)
        stamp start train
        echo $$ > "$out.pid"
        sleep "$FAKE_SECONDS"
        [[ $(basename "$out") == "$FAKE_FAIL" ]] && { echo "fake failure of $out"; exit 7; }
        mkdir -p "$out"; touch "$out/best.safetensors"
        stamp end train ;;
    evaluate.py*)
        if [[ -n $out ]]; then stamp start eval; mkdir -p "$out"; touch "$out/metrics.json"; stamp end eval
        else echo "| a fake table |"; fi ;;
esac
"""


def _fake_env(tmp_path, seconds, fail=""):
    """The environment of FULL=1 demo.sh over seeds 0 and 1 with FAKE_PIPELINE as python."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIPELINE)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls"),
               EVENTS=str(tmp_path / "events"), FAKE_SECONDS=str(seconds), FAKE_FAIL=fail, FULL="1", SEEDS="0 1",
               JOBS="2")
    env.pop("CORPUS", None), env.pop("BACKBONES", None), env.pop("QUICK", None)
    return env


def _events(tmp_path):
    """[(start|end, train|eval, run folder, time)] that the faked stage-3 runs logged."""
    if not (tmp_path / "events").exists():
        return []
    return [(e, w, run, float(t)) for e, w, run, t in map(str.split, (tmp_path / "events").read_text().splitlines())]


def _fake_demo(tmp_path, seconds, fail=""):
    """Run demo.sh on FAKE_PIPELINE to its end -> (process, events)."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=_fake_env(tmp_path, seconds, fail), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc, _events(tmp_path)


def _stopped(tmp_path):
    """True when every faked joint_train.py that started has ended (its pid no longer runs, or is a zombie)."""
    pids = [int(p.read_text()) for p in (tmp_path / "out").glob("*.pid")]
    return pids and all(not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
                        for pid in pids)


def test_stage3_runs_two_at_a_time_each_after_its_base(tmp_path):
    """--full's runs (stage 3, then evaluation) go two at a time; a run's evaluation starts after the evaluation
    of its seed's base (it compares with its hypotheses); every run is trained and evaluated once."""
    proc, events = _fake_demo(tmp_path, 0.3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # seeds 0 and 1; layers: selected "0 1", all "0 1 2": Table 3's layer 0, layer 1, all; Table 4; En-Ja
    keys = ["base", "aista", "layer0", "layer1", "all", "ctc", "cl", "base_ja", "aista_ja"]
    runs = {f"{k}" if s == 0 else f"{k}_seed{s}" for k in keys for s in (0, 1)}
    for what, prefix in (("train", "stage3_"), ("eval", "eval_")):
        started = [run for e, w, run, _ in events if e == "start" and w == what]
        assert sorted(started) == sorted(prefix + r for r in runs)
    active, most = 0, 0
    for e, _, _, _ in sorted(events, key=lambda e: e[3]):
        active += 1 if e == "start" else -1
        most = max(most, active)
    assert most == 2
    end = {(w, run): t for e, w, run, t in events if e == "end"}
    for e, w, run, t in events:
        if e == "start" and w == "eval" and "base" not in run:
            seed = run.rsplit("_seed", 1)[1] if "_seed" in run else "0"
            base = ("eval_base_ja" if run.startswith("eval_aista_ja") else "eval_base") + ("" if seed == "0" else f"_seed{seed}")
            assert t >= end[("eval", base)], (run, base)
    assert "a fake table" in proc.stdout and "Table 3" in proc.stdout and "En->Ja" in proc.stdout


def test_a_failed_run_stops_the_demo_and_the_other_runs(tmp_path):
    """One run fails: the demo stops with its exit status and the end of its log, and stops the run beside it."""
    proc, events = _fake_demo(tmp_path, 3, fail="stage3_aista")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "the run aista_seed0 failed (exit 7)" in proc.stderr and "fake failure of" in proc.stderr
    assert _stopped(tmp_path)
    assert not any(w == "eval" and run == "eval_aista" for _, w, run, _ in events)


def test_ctrl_c_stops_the_runs_in_the_background(tmp_path):
    """Ctrl-C (SIGINT to the terminal's foreground group, the demo's) also stops the runs in their own groups."""
    import signal
    import time
    demo = subprocess.Popen(["bash", os.path.join(ROOT, "demo.sh")], env=_fake_env(tmp_path, 60), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while len(_events(tmp_path)) < 2 and time.time() - t0 < 60:  # both slots busy with a 60 s run
            time.sleep(0.2)
        assert len(_events(tmp_path)) == 2
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=30) == 130
        time.sleep(0.5)
        assert _stopped(tmp_path)
    finally:
        if demo.poll() is None:
            demo.kill()
