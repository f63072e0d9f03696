"""What a run guarantees when things go wrong (docs/troubleshooting.md names these tests): one run per output
folder, no run that ends without its final weights and says it succeeded, a checkpoint a diverged run can continue
from, write errors as one line, a dev set that cannot steer early stopping with NaN, the umask's file modes. All on
the toy objective of test_train.py (no model is loaded), in seconds."""
import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import runtime
import shards
import toy_objective
import train
from test_train import ROOT, manifests, metrics, one_thread, toy_args  # noqa: F401 (fixtures)
from toy_objective import Toy, collate, toy_data

TOY = os.path.join(ROOT, "tests", "toy_objective.py")


def cli(main, script="toy_objective.py"):
    """Run main through runtime.cli -> (exit status, the one error line), as the command line would end."""
    with pytest.raises(SystemExit) as e:
        runtime.cli(main, script)
    return e.value.code


# ----------------------------------------------------------------------------- one run per output folder


def test_a_second_run_in_a_busy_folder_stops_at_once_and_touches_nothing(tmp_path, capsys):
    """A job submitted twice: the second run stops before it opens anything in the folder, naming the folder and
    the holder (pid, host, command line); the first run's metrics.jsonl is untouched."""
    out = tmp_path / "run"
    train.train(toy_args(out, "--max-steps", "2"), Toy(), toy_data(), collate)
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    with runtime.folder_lock(str(out)):
        holder = (out / runtime.LOCK).read_text()
        assert f"pid {os.getpid()} on " in holder
        code = cli(lambda: toy_objective.main(["--output-dir", str(out), "--batch-size", "4", "--seed", "7",
                                               "--num-workers", "0", "--resume"]))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--output-dir {out} is in use by another run (pid {os.getpid()} on " in err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    """The lock is the kernel's (flock): a run killed with SIGKILL releases it, and the next run starts."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runtime\n"
                               "with runtime.folder_lock(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(120)\n", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runtime.FolderBusy, match=f"pid {holder.pid} on "):
            train.train(toy_args(out, "--max-steps", "1"), Toy(), toy_data(), collate)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    end = train.train(toy_args(out, "--max-steps", "1"), Toy(), toy_data(), collate)
    assert end["step"] == 1


def test_an_evaluation_in_a_busy_folder_stops_before_loading_the_model(tmp_path, capsys):
    import evaluate as E
    ckpt, manifest = tmp_path / "w.safetensors", tmp_path / "test.jsonl"
    ckpt.write_bytes(b"")
    (tmp_path / "w.safetensors.json").write_text("{}")
    manifest.write_text(json.dumps(dict(id="a", audio="a.wav", task="st", text="hi", translation="你好",
                                        tgt_lang="zh")) + "\n")
    out = tmp_path / "eval"
    with runtime.folder_lock(str(out)):
        code = cli(lambda: E.main(["--ckpt", str(ckpt), "--manifest", str(manifest), "--output-dir", str(out)]),
                   "evaluate.py")
    assert code == 1 and f"--output-dir {out} is in use by another run" in capsys.readouterr().err


def test_default_evaluation_folders_do_not_collide(tmp_path):
    """Same-named manifests in two folders, and best/last of one run, get folders of their own."""
    import evaluate as E
    run = tmp_path / "run"
    zh, ja = (str(tmp_path / lang / "test.jsonl") for lang in ("zh", "ja"))
    folders = {E.default_output_dir(str(run / ck), m) for ck in ("best.safetensors", "last.safetensors")
               for m in (zh, ja)}
    assert len(folders) == 4 and all(os.path.dirname(f) == str(run / "eval") for f in folders)
    assert os.path.basename(E.default_output_dir(str(run / "best.safetensors"), zh)).startswith("best.test-")


def test_one_process_never_waits_for_partial_files_nobody_writes(tmp_path):
    with pytest.raises(ValueError, match=r"hypotheses missing after decoding \(st 3 of 3\)"):
        shards.wait_for_partial(str(tmp_path), ["st"], 3, skip_bad=False, wait=False)


# ----------------------------------------------------------------------------- final weights, divergence


def test_a_run_ending_inside_a_bad_streak_fails_without_claiming_weights(tmp_path, capsys):
    """Steps 6 and 7 of 8 non-finite (fewer than --max-bad-steps): the run has no final weights, exits 1 and says
    which checkpoint holds the last good ones; it never prints "done ... weights in"."""
    args = toy_args(tmp_path, "--max-steps", "8", "--save-every", "4", "--max-bad-steps", "5")
    code = cli(lambda: train.train(args, Toy(nan_calls={6, 7}), toy_data(), collate))
    out, err = capsys.readouterr()
    assert code == 1 and "done at step" not in out
    assert "ended inside a streak of 2 bad step(s) (last: step 7), so it wrote no final weights" in err
    assert f"{tmp_path / 'checkpoint.pt'} (step 4" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["step"] == 4
    assert metrics(tmp_path)[-1]["stopped"] == "bad_steps"


def test_a_diverged_run_keeps_a_checkpoint_it_can_continue_from(tmp_path):
    """--lr 1e30 reached at step 1: step 1's update blows the weights up while its loss is still finite. That
    step is bad (--max-weight-growth), so no checkpoint holds its weights; --max-bad-steps 2 stops the run naming
    the step-1 checkpoint, and resuming from it with a sane --lr trains with finite losses."""
    blow_up = ["--lr", "1e30", "--warmup-start-lr", "0.001", "--warmup-steps", "4", "--save-every", "1",
               "--max-bad-steps", "2"]
    toy = Toy()
    with pytest.raises(train.Diverged, match=r"2 bad steps in a row .*checkpoint.pt \(step 1;"):
        train.train(toy_args(tmp_path, *blow_up), toy, toy_data(), collate)
    assert toy.lin.weight.abs().max() > 1e20  # the weights did blow up in memory ...
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["state"]["step"] == 1 and kept["model"]["lin.weight"].abs().max() < 10  # ... not in the checkpoint
    assert torch.equal(load_file(tmp_path / "last.safetensors")["lin.weight"], kept["model"]["lin.weight"])
    again = Toy()
    end = train.train(toy_args(tmp_path, "--resume", "--resume-changes", "apply", "--lr", "0.01", "--warmup-steps",
                               "4", "--save-every", "1", "--max-steps", "6"), again, toy_data(), collate)
    rows = [r for r in metrics(tmp_path) if "loss" in r and r["step"] > 1]
    assert end["step"] == 6 and end["bad_steps"] == 0 and len(rows) == 5
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_ordinary_steps_never_trip_the_growth_check(tmp_path):
    """At the toy's lr 0.01 (a per-step change of about 1% of the weights' norm) no step is bad."""
    end = train.train(toy_args(tmp_path, "--max-steps", "8"), Toy(), toy_data(), collate)
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    assert end["bad_steps"] == 0 and len(rows) == 8
    growth = [b["weight_norm"] / a["weight_norm"] for a, b in zip(rows, rows[1:])]
    assert max(growth) < 1.1


# ----------------------------------------------------------------------------- the dev set


def test_an_unreadable_dev_set_stops_the_run(tmp_path):
    """Every dev clip unreadable (--skip-bad): no NaN accuracy decides anything; the run stops naming --dev."""
    items, skip_bad = toy_objective.bad_items(toy_data(), set())
    dev = [dict(item, bad=True) for item in toy_data(2)]
    with pytest.raises(train.DevSetError, match=r"--dev: no dev item could be read \(2 unreadable clip"):
        train.train(toy_args(tmp_path, "--eval-every", "2"), Toy(accs=[0.5] * 9), items, skip_bad, dev_set=dev)
    assert not (tmp_path / "best.safetensors").exists()


def test_dev_clips_that_come_and_go_stop_the_run(tmp_path, capsys):
    """One unreadable dev clip is counted (end line) as long as it stays the same; a second one stops the run."""
    items, skip_bad = toy_objective.bad_items(toy_data(), set())
    dev = [dict(item, bad=i == 0) for i, item in enumerate(toy_data(3))]
    end = train.train(toy_args(tmp_path / "a", "--eval-every", "4"), Toy(accs=[0.5] * 9), items, skip_bad,
                      dev_set=dev)
    assert end["dev_bad_audio"] == 1 and "1 unreadable dev clip(s) left out of every validation" in capsys.readouterr().out

    class Flaky(list):
        reads = 0

        def __getitem__(self, i):
            Flaky.reads += 1
            return dict(super().__getitem__(i), bad=i == 0 or (i == 1 and Flaky.reads > 3))
    with pytest.raises(train.DevSetError, match=r"2 dev clip\(s\) were unreadable in this validation, 1 in the first"):
        train.train(toy_args(tmp_path / "b", "--eval-every", "4"), Toy(accs=[0.5] * 9), items, skip_bad,
                    dev_set=Flaky(toy_data(3)))


# ----------------------------------------------------------------------------- files: write errors, modes


WRITE_FAILURES = r"""
import json, os, resource, signal, sys, torch
sys.path.insert(0, "tests")
import runtime, toy_objective
folder = sys.argv[1]
big = toy_objective.Toy()
big.big = torch.nn.Parameter(torch.zeros(5000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
out = {}
for name, write in (("checkpoint.pt", lambda p: runtime.atomic(p, lambda t: runtime.torch_save(torch.zeros(5000), t))),
                    ("last.safetensors", lambda p: runtime.save_weights(big, p))):
    try:
        write(os.path.join(folder, name))
    except runtime.WriteError as e:
        out[name] = str(e)
out["files"] = sorted(os.listdir(folder))
print(json.dumps(out))
"""


def test_write_errors_name_the_path_and_leave_no_temporary_file(tmp_path):
    """A real failed write (RLIMIT_FSIZE: EFBIG, what a full disk gives as ENOSPC) in torch.save (whose own error
    says only "unexpected pos") and in safetensors: one message naming the path and the reason, nothing left."""
    proc = subprocess.run([sys.executable, "-c", WRITE_FAILURES, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for name in ("checkpoint.pt", "last.safetensors"):
        assert out[name].startswith(f"cannot write {tmp_path / name}: File too large (EFBIG)"), out
    assert out["files"] == []


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """EROFS at the rename of checkpoint.pt (injected: a test running as root cannot make a folder read-only): the
    run stops with one line, its temporary file removed."""
    real = os.replace

    def read_only(src, dst):
        if dst.endswith("checkpoint.pt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)
        return real(src, dst)
    monkeypatch.setattr(runtime.os, "replace", read_only)
    code = cli(lambda: train.train(toy_args(tmp_path, "--max-steps", "2"), Toy(), toy_data(), collate))
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and err == (f"toy_objective.py: error: cannot write {tmp_path / 'checkpoint.pt'}: Read-only file "
                                 f"system (EROFS); nothing was replaced (the previous version, if any, is intact)")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_output_files_follow_the_umask(tmp_path):
    """safetensors writes 0600 files; the run's files get 0666 & ~umask like any other."""
    old = os.umask(0o022)
    try:
        train.train(toy_args(tmp_path, "--max-steps", "2"), Toy(), toy_data(), collate)
    finally:
        os.umask(old)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in os.listdir(tmp_path) if name != ".lock"}
    assert modes and set(modes.values()) == {0o644}, modes


# ----------------------------------------------------------------------------- flag values


TRAIN = ["--train", "t.jsonl", "--output-dir", "o"]
STAGE3 = ["--init", "w.safetensors", *TRAIN]
STAGE2 = ["--init", "w.safetensors", "--manifest", "m.jsonl", "--output-dir", "o"]
BAD_FLAGS = [  # (script, arguments, the start of the one error line's message)
    ("pretrain", ["--lr", "0"], "argument --lr: expected a number > 0, got '0'"),
    ("pretrain", ["--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    ("pretrain", ["--log-every", "0"], "argument --log-every: expected an integer >= 1"),
    ("pretrain", ["--save-every", "0"], "argument --save-every: expected an integer >= 1"),
    ("pretrain", ["--adam-betas", "1.5", "0.999"], "argument --adam-betas: expected a number in [0, 1), got '1.5'"),
    ("pretrain", ["--num-workers", "-1"], "argument --num-workers: expected an integer >= 0"),
    ("pretrain", ["--epoch-size", "-4"], "argument --epoch-size: expected an integer >= 1"),
    ("pretrain", ["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0"),
    ("pretrain", ["--qformer-heads", "0"], "argument --qformer-heads: expected an integer >= 1"),
    ("pretrain", ["--lora-dropout", "1"], "argument --lora-dropout: expected a number in [0, 1)"),
    ("joint_train", ["--eval-every", "0"], "argument --eval-every: expected an integer >= 1"),
    ("joint_train", ["--ot-eps", "0"], "argument --ot-eps: expected a number >= 0.0001"),
    ("joint_train", ["--ot-eps", "1e-8"], "argument --ot-eps: expected a number >= 0.0001"),
    ("joint_train", ["--ot-iters", "0"], "argument --ot-iters: expected an integer >= 1"),
    ("joint_train", ["--alpha", "2"], "argument --alpha: expected a number in [0, 1], got '2'"),
    ("joint_train", ["--cl-temperature", "0"], "argument --cl-temperature: expected a number > 0"),
    ("joint_train", ["--layers", "0", "0", "1"], "argument --layers: a value is given twice: 0 0 1"),
    ("select_layers", ["--ot-eps", "0"], "argument --ot-eps: expected a number >= 0.0001"),
    ("select_layers", ["--chunk-size", "0"], "argument --chunk-size: expected an integer >= 1"),
    ("select_layers", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    ("select_layers", ["--rows", "0"], "argument --rows: expected an integer >= 1"),
    ("select_layers", ["--threshold", "nan"], "argument --threshold: expected a number in [0, 1), got 'nan'"),
    ("select_layers", ["--num-pairs", "1"], "argument --num-pairs: expected an integer >= 2"),
    ("evaluate", ["--audio", "f.wav", "--ckpt", "w", "--tgt-lang", "xx"], "argument --tgt-lang: unknown target "
                                                                         "language 'xx'"),
    ("evaluate", ["--hyps", "."], "argument --hyps: . is a folder; expected a file"),
    ("evaluate", ["--manifest", "m", "--ckpt", "w", "--num-workers", "-1"], "argument --num-workers: expected an "
                                                                           "integer >= 0"),
    ("evaluate", ["--manifest", "m", "--ckpt", "w", "--limit", "-1"], "argument --limit: expected an integer >= 1"),
    ("evaluate", ["--manifest", "m", "--ckpt", "w", "--alignment", "1", "1"], "argument --alignment: a value is "
                                                                              "given twice"),
    ("gpu_plan", ["--measure-layers", "1"], "argument --measure-layers: give at least 2 depths"),
]


@pytest.mark.parametrize("script, argv, message", BAD_FLAGS, ids=[" ".join(c[1]) for c in BAD_FLAGS])
def test_a_bad_flag_value_is_one_line_before_any_model_loads(script, argv, message, capsys, monkeypatch):
    """main() stops at the flags: the files named above do not exist, and nothing is loaded."""
    import importlib
    module = importlib.import_module(script)
    monkeypatch.setattr("model.LSM.from_trainable", lambda *a, **k: pytest.fail("a model was loaded"))
    base = {"pretrain": TRAIN, "joint_train": STAGE3, "select_layers": STAGE2}.get(script, [])
    with pytest.raises(SystemExit) as e:
        module.main(base + argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and ": error: " + message in err, err


def test_select_layers_refuses_a_device_this_machine_lacks(capsys):
    import select_layers
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SystemExit):
        select_layers.parser().parse_args(STAGE2 + ["--device", f"cuda:{n}"])
    assert f"argument --device: 'cuda:{n}': this machine has " in capsys.readouterr().err


def test_help_shows_every_range():
    import joint_train
    text = " ".join(joint_train.parser().format_help().split())
    for piece in ("--lr LR peak learning rate [a number > 0] (default: 3e-05)", "[a number in [0, 1]] (default: 0.99)",
                  "--qformer-heads QFORMER_HEADS [an integer >= 1] (default: 12)"):
        assert piece in text, piece


def test_gpu_plan_refuses_a_fit_from_a_single_depth():
    """Steps at one LLM depth (two batch sizes: as many points as unknowns after the fallback) cannot tell the
    per-layer term from the per-sample one: refused instead of a plan off by 2.5x."""
    import gpu_plan
    w, u, v = 3e8, 2e8, 5e7
    points = [dict(batch=B, llm_layers=1, activation_bytes=w + B * (u + v)) for B in (1, 2)]
    with pytest.raises(ValueError, match=r"needs measured steps at 2 or more LLM depths, got only \[1\]"):
        gpu_plan.fit_activations(points)
    points += [dict(batch=1, llm_layers=4, activation_bytes=w + u + 4 * v),
               dict(batch=4, llm_layers=1, activation_bytes=w + 4 * (u + v))]
    fit = gpu_plan.fit_activations(points)  # the deepest point is needed, so it is not held out
    assert "held_out" not in fit and fit["v"] == pytest.approx(v, rel=1e-9) and fit["u"] == pytest.approx(u, rel=1e-9)


# ----------------------------------------------------------------------------- --table


def test_table_refuses_a_file_given_twice_and_a_layers_json(tmp_path, capsys):
    import evaluate as E
    m = tmp_path / "metrics.json"
    m.write_text(json.dumps(dict(name="base", bleu={"st": {"zh": {"score": 40.0}}})))
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps(dict(mrr={"0": 0.5}, selected=[0], threshold=0.05, num_pairs=100)))
    for argv, message in (([str(m), str(tmp_path / "." / "metrics.json")], f"is the same file as {m}"),
                          ([str(layers)], f"{layers}: select_layers.py's layers.json, not evaluate.py's metrics.json: "
                                          f"print it with --mrr")):
        assert cli(lambda: E.main(["--table", *argv]), "evaluate.py") == 1
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the same on the real stage-1 script


def test_pretrain_diverges_keeps_a_good_checkpoint_and_resumes_finite(tiny_ckpts, manifests, tmp_path, capsys):
    """The advice of docs/troubleshooting.md, end to end on pretrain.py with the tiny model: --lr 1e30 reached at
    step 1 (save every step, --max-bad-steps 2) stops the run naming checkpoint.pt at step 1; resumed from it with
    a sane --lr (--resume --resume-changes apply) every step is finite. And a run whose every step is bad exits 1
    without claiming weights (it used to print "done ... weights in" and exit 0)."""
    import pretrain
    from test_train import RUN_FLAGS, tiny_flags
    common = ["--train", manifests["asr"], "--output-dir", str(tmp_path / "run"), "--batch-size", "2",
              "--warmup-steps", "2", "--save-every", "1", *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS]
    code = cli(lambda: pretrain.main(common + ["--lr", "1e30", "--warmup-start-lr", "1e-4", "--max-bad-steps", "2",
                                               "--max-steps", "6"]), "pretrain.py")
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and "2 bad steps in a row (last: step 2" in err and "checkpoint.pt (step 1;" in err, err
    pretrain.main(common + ["--lr", "1e-3", "--warmup-start-lr", "1e-4", "--min-lr", "1e-4", "--max-steps", "4",
                            "--resume", "--resume-changes", "apply"])
    rows = [r for r in metrics(tmp_path / "run") if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["bad_steps"] == 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    capsys.readouterr()
    code = cli(lambda: pretrain.main(common[:3] + [str(tmp_path / "all_bad")] + common[4:] + [
        "--lr", "1e30", "--min-lr", "1e30", "--warmup-steps", "0", "--max-steps", "3"]), "pretrain.py")
    out, err = capsys.readouterr()
    assert code == 1 and "done at step" not in out and "so it wrote no final weights" in err
    assert not (tmp_path / "all_bad" / "last.safetensors").exists()


def test_every_test_named_in_the_troubleshooting_page_exists():
    """docs/troubleshooting.md backs each claim with a test: those tests must exist (renaming one breaks this)."""
    import re
    with open(os.path.join(ROOT, "docs", "troubleshooting.md"), encoding="utf-8") as f:
        named = set(re.findall(r"(test_\w+)\.py::(test_\w+)", f.read()))
    assert len(named) > 30
    for module, test in sorted(named):
        with open(os.path.join(ROOT, "tests", module + ".py"), encoding="utf-8") as f:
            assert re.search(rf"^def {test}\(", f.read(), re.M), f"{module}.py::{test}"
