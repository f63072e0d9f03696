"""train.py (the shared loop) and pretrain.py (stage 1): schedule, weight-decay groups, batch layout, non-finite
steps, early stopping, atomic checkpoints on a toy objective; end to end, CE falling, kill-and-resume and
torchrun (2 processes, gloo) on the tiny checkpoints (CPU, float32)."""
import argparse
import copy
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import model as M
import pretrain
import runtime
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 cores shared with other jobs: one intra-op thread is several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers shared with the other tests


def tiny_flags(ckpts, beats=False):
    """Model and runtime flags for the tiny checkpoints (float32, no workers, no autocast)."""
    flags = ["--whisper", ckpts["whisper"], "--llm", ckpts["llm"], "--qformer-hidden", "32", "--qformer-heads", "2",
             "--qformer-ffn", "64", "--llm-dtype", "float32"]
    return flags + (["--beats", ckpts["beats"]] if beats else ["--no-beats"])


RUN_FLAGS = ["--dtype", "float32", "--num-workers", "0", "--log-every", "1"]


def write_manifest(folder, name, rows, seconds=None, seed=0):
    """Write noise clips for `rows` (dicts without "audio") and a JSON-lines manifest; returns its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        audio = f"{name}_{row['id']}.wav"
        sec = seconds[i] if seconds else 1.0 + 0.25 * (i % 3)
        sf.write(os.path.join(folder, audio), (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
        lines.append(json.dumps(dict(row, audio=audio)) + "\n")
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


ST_ROWS = [dict(id="s1", task="st", text="hello world", translation="你好世界", tgt_lang="zh"),
           dict(id="s2", task="st", text="the quick brown fox", translation="こんにちは世界", tgt_lang="ja"),
           dict(id="s3", task="st", text="one two three", translation="你好", tgt_lang="zh"),
           dict(id="s4", task="st", text="a dog barks", translation="世界", tgt_lang="zh")]


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a toy objective


import toy_objective  # noqa: E402 (also run by torchrun below)
from toy_objective import Toy, collate, toy_data  # noqa: E402


def toy_args(out, *extra, warmup=3, max_steps=8):
    p = train.add_train_args(argparse.ArgumentParser(), warmup_steps=warmup, max_steps=max_steps, validation=True)
    return p.parse_args(["--output-dir", str(out), "--batch-size", "4", "--lr", "0.01", "--warmup-start-lr", "0.001",
                         "--min-lr", "0.002", *RUN_FLAGS, *extra])


# ----------------------------------------------------------------------------- schedule, groups, layout


def test_lr_schedule_matches_formula(tmp_path):
    p = train.add_train_args(argparse.ArgumentParser(), warmup_steps=9000, max_steps=80000)
    a = p.parse_args(["--output-dir", "x"])
    assert (a.lr, a.warmup_start_lr, a.min_lr, a.weight_decay, a.batch_size) == (3e-5, 1e-6, 1e-5, 0.05, 32)
    expected = {0: 1e-6, 4500: 1e-6 + 29e-6 / 2, 8999: 1e-6 + 29e-6 * 8999 / 9000, 9000: 3e-5,
                9000 + 71000 / 4: 1e-5 + 2e-5 * (1 + math.cos(math.pi / 4)) / 2, 44500: 2e-5, 80000: 1e-5}
    for step, lr in expected.items():
        assert train.lr_at(step, a) == pytest.approx(lr, rel=1e-12), step
    # the optimiser really uses it: lr logged for step s (row step = s + 1) equals lr_at(s)
    args = toy_args(tmp_path, warmup=3, max_steps=8)
    train.train(args, Toy(), toy_data(), collate)
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["lr"] == pytest.approx(train.lr_at(r["step"] - 1, args), rel=1e-12)
    assert rows[0]["lr"] == pytest.approx(0.001) and rows[3]["lr"] == pytest.approx(0.01)


def test_weight_decay_groups(tiny_ckpts):
    import joint_train
    p = tiny_ckpts["qwen2"]
    lsm = M.LSM(p["whisper"], p["llm"], p["beats"], llm_dtype="float32", verbose=False, qformer_hidden=32,
                qformer_heads=2, qformer_ffn=64)
    obj = joint_train.AlignedObjective(lsm, "ctc")
    a = argparse.Namespace(lr=3e-5, weight_decay=0.05, adam_betas=[0.9, 0.999], adam_eps=1e-8, warmup_start_lr=1e-6,
                           min_lr=1e-5, warmup_steps=10, max_steps=100)
    opt, _ = train.build_optimizer(obj, a)
    names = {id(p): n for n, p in obj.named_parameters()}
    decay = {names[id(q)] for q in opt.param_groups[0]["params"]}
    no = {names[id(q)] for q in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    trainable = {n for n, q in obj.named_parameters() if q.requires_grad}
    assert decay | no == trainable and not decay & no  # every trainable parameter once, no frozen one
    params = dict(obj.named_parameters())
    assert all(params[n].ndim == 1 for n in no) and all(params[n].ndim >= 2 for n in decay)
    assert any("LayerNorm" in n or "layernorm" in n for n in no)  # the Q-Former's norms
    for n in ("lsm.proj.weight", "lsm.qformer.query", "ctc_head.weight"):
        assert n in decay
    for n in ("lsm.proj.bias", "lsm.ln_whisper.weight", "lsm.ln_beats.bias", "ctc_head.bias"):
        assert n in no
    assert sum("lora_A" in n for n in decay) == sum("lora_B" in n for n in decay) == 6
    w2 = torch.zeros(2, 2)  # the name rule also covers matrices called bias / norm
    assert train.no_decay("x.bias", w2) and train.no_decay("enc.LayerNorm.weight", w2)
    assert not train.no_decay("x.weight", w2) and train.no_decay("x.weight", torch.zeros(2))


def test_batch_layout_and_errors():
    ns = lambda B, b=None, k=None: argparse.Namespace(batch_size=B, per_device_batch_size=b, grad_accum=k)
    assert runtime.batch_layout(ns(32), 8) == (4, 1)
    assert runtime.batch_layout(ns(32, b=2), 8) == (2, 2)
    assert runtime.batch_layout(ns(32, k=4), 2) == (4, 4)
    assert runtime.batch_layout(ns(32, 4, 8), 1) == (4, 8)
    for bad, world in ((ns(32, 3), 2), (ns(32, 4, 4), 4), (ns(30), 8)):
        with pytest.raises(ValueError, match=r"--batch-size .*--per-device-batch-size x --grad-accum"):
            runtime.batch_layout(bad, world)


def test_micro_batches_do_not_depend_on_world_size():
    order = list(np.random.default_rng(0).permutation(40))  # 5 global batches of 8
    def all_micro(world, k, b, first=0):
        per_rank = [train.rank_micro_batches(order, first, 8, b, k, r) for r in range(world)]
        steps = len(per_rank[0]) // k
        return [[m for r in range(world) for m in per_rank[r][s * k:(s + 1) * k]] for s in range(steps)]
    ref = all_micro(1, 4, 2)
    assert ref == all_micro(2, 2, 2) == all_micro(4, 1, 2)  # same micro-batches in the same order, per step
    assert [sum(step, []) for step in all_micro(1, 1, 8)] == [order[i:i + 8] for i in range(0, 40, 8)]
    assert all_micro(2, 2, 2, first=3) == ref[3:]  # resume skips consumed steps
    # the epoch order is a function of (seed, epoch) only; a mixture follows the weights
    a = train.epoch_order([3, 5], [1.0, 1.0], 8, 7, 2)
    assert a == train.epoch_order([3, 5], [1.0, 1.0], 8, 7, 2) != train.epoch_order([3, 5], [1.0, 1.0], 8, 7, 3)
    mix = train.epoch_order([100, 100], [3.0, 1.0], 4000, 0, 0)
    assert np.mean(np.array(mix) < 100) == pytest.approx(0.75, abs=0.03)


def test_parse_manifests():
    assert train.parse_manifests(["a.jsonl:1.5", "b/c.jsonl", "d.jsonl:0"]) == [
        ("a.jsonl", 1.5), ("b/c.jsonl", 1.0), ("d.jsonl", 0.0)]
    with pytest.raises(ValueError, match="x.jsonl:-1"):
        train.parse_manifests(["x.jsonl:-1"])


# ----------------------------------------------------------------------------- non-finite steps, early stop, files


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    toy = Toy(nan_calls={2, 3})
    end = train.train(toy_args(tmp_path, "--max-bad-steps", "3"), toy, toy_data(), collate)
    assert end["bad_steps"] == 2 and end["step"] == 8
    assert torch.equal(toy.seen[2], toy.seen[3]) and torch.equal(toy.seen[3], toy.seen[4])  # no update at 2, 3
    assert not torch.equal(toy.seen[1], toy.seen[2]) and not torch.equal(toy.seen[4], toy.seen[5])
    rows = {r["step"]: r for r in metrics(tmp_path) if "lr" in r}
    assert rows[3]["loss"] is None and rows[3]["bad_steps"] == 1 and rows[4]["bad_steps"] == 2
    assert math.isfinite(rows[5]["loss"])
    assert torch.isfinite(toy.lin.weight).all()


def test_too_many_non_finite_steps_stop_and_keep_the_last_checkpoint(tmp_path):
    """Issue 11.5: no checkpoint is written during a streak of non-finite steps, so the checkpoint the stop message
    names is one from before the streak (a checkpoint every step: steps 0 and 1 good, 2-4 non-finite)."""
    toy = Toy(nan_calls={2, 3, 4})
    with pytest.raises(FloatingPointError, match=r"3 bad steps in a row .*written before the bad steps: "
                                                 r".*checkpoint.pt \(step 2"):
        train.train(toy_args(tmp_path, "--max-bad-steps", "3", "--save-every", "1"), toy, toy_data(), collate)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == 2 and ck["state"]["bad_in_row"] == 0  # written after the last good step
    assert torch.equal(ck["model"]["lin.weight"], toy.seen[2])  # the weights after the last good update
    assert torch.equal(toy.lin.weight.detach(), toy.seen[2]) and len(toy.seen) == 5
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_checkpoint_due_in_a_streak_waits_for_a_finite_step(tmp_path):
    """A streak shorter than --max-bad-steps: the checkpoint due at step 4 (inside the streak) is written after the
    next finite step instead, and the run resumes from there."""
    toy = Toy(nan_calls={3, 4})
    end = train.train(toy_args(tmp_path, "--max-bad-steps", "3", "--save-every", "4", "--max-steps", "7"), toy,
                      toy_data(), collate)
    assert end["step"] == 7 and end["bad_steps"] == 2
    saved = [r for r in metrics(tmp_path) if r.get("event") == "end"]
    assert saved and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["step"] == 7
    toy2 = Toy(nan_calls={3, 4})
    out = tmp_path / "b"
    train.train(toy_args(out, "--max-bad-steps", "3", "--save-every", "4", "--max-steps", "7",
                         "--stop-after-steps", "6"), toy2, toy_data(), collate)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 6  # 4 was due, 5 still bad


def bad_items(bad):
    """toy_data with the items `bad` unreadable, and a collate that drops them as data.Collator does."""
    return toy_objective.bad_items(toy_data(), bad)


class Recorder(Toy):
    """Toy that records each forward's batch and the state before it."""

    def forward(self, batch):
        self.log = getattr(self, "log", []) + [(batch, copy.deepcopy(self.state_dict()))]
        return super().forward(batch)


def test_unreadable_items_cost_only_their_absence(tmp_path):
    """Issue 11.3. Global batch 4 = 1 item x 4 micro-batches: the first micro-batch of the run is unreadable (the old
    loop stopped: 'the first micro-batch has no readable audio'), later a whole micro-batch, and one step has no
    readable item at all. A step's gradient is the mean over its readable micro-batches (by hand below), the
    logged loss is this step's, and a step with nothing readable leaves the weights and Adam's state untouched."""
    args = toy_args(tmp_path, "--per-device-batch-size", "1", "--max-steps", "3", "--lr", "0.1", "--warmup-steps", "0",
                    "--save-every", "1")
    order = train.epoch_order([16], [1.0], 16, args.seed, 0)
    items, skip_bad = bad_items({order[0], order[5], order[8], order[9], order[10], order[11]})  # step 2: all bad
    toy, after_two = Recorder(), Toy()
    train.train(args, toy, items, skip_bad)
    assert len(toy.log) == 3 + 3  # step 0: 3 readable micro-batches, step 1: 3, step 2: none
    assert toy.skips == 1 + 1 + 4  # each skipped micro-batch joins the collectives its forward would have run
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    for step, first in ((0, 0), (1, 3)):  # the logged loss: the mean of this step's readable micro-batch losses
        ref = Toy()
        ref.load_state_dict(toy.log[first][1])
        losses = [ref(b)["loss"].item() for b, _ in toy.log[first:first + 3]]
        assert rows[step]["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6) and rows[step]["n_bad_audio"] == 1
    assert "loss" not in rows[2] and rows[2]["n_bad_audio"] == 4  # step 2: nothing readable, no loss
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == 3 and ck["state"]["empty_steps"] == 1
    assert all(v["step"] == 2 for v in ck["optimizer"]["state"].values())  # Adam stepped twice, not three times
    train.train(toy_args(tmp_path / "two", "--per-device-batch-size", "1", "--max-steps", "3", "--lr", "0.1",
                         "--warmup-steps", "0", "--stop-after-steps", "2"), after_two, items, skip_bad)
    for n, p in toy.named_parameters():  # the same run stopped before the empty step: the same weights
        assert torch.equal(p, dict(after_two.named_parameters())[n]), n
    end = [r for r in metrics(tmp_path) if r.get("event") == "end"][0]
    assert end["counts"] == {"bad_audio": 6, "truncated": 0} and end["empty_steps"] == 1


def test_step_gradient_is_the_mean_over_readable_micro_batches(tmp_path):
    """One step, 4 micro-batches of 1, the first unreadable: the update equals AdamW's first step on the mean
    gradient of the 3 readable ones (computed by hand with torch.optim.AdamW)."""
    args = toy_args(tmp_path, "--per-device-batch-size", "1", "--max-steps", "1", "--lr", "0.1", "--warmup-steps", "0",
                    "--warmup-start-lr", "0.1", "--weight-decay", "0")
    order = train.epoch_order([16], [1.0], 16, args.seed, 0)
    items, skip_bad = bad_items({order[0]})
    toy = Recorder()
    train.train(args, toy, items, skip_bad)
    ref = Toy()
    ref.load_state_dict(toy.log[0][1])
    params = [q for q in ref.parameters() if q.requires_grad]
    (sum(ref(b)["loss"] for b, _ in toy.log) / 3).backward()
    torch.optim.AdamW(params, lr=0.1, weight_decay=0.0).step()
    for (n, p), q in zip([(n, p) for n, p in toy.named_parameters() if p.requires_grad], params):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n  # Adam's first step: lr * g / (|g| + eps): float noise


def test_kill_and_resume_across_unreadable_items_equals_uninterrupted(tmp_path):
    """Checkpoint at step 2, killed at step 3; the first micro-batch after the checkpoint is unreadable (the old loop
    could never resume there). The resumed run ends with the weights and Adam state of the uninterrupted one."""
    args = lambda out, *x: toy_args(out, "--per-device-batch-size", "1", "--max-steps", "6", "--save-every", "2", *x)
    order = train.epoch_order([16], [1.0], 16, 42, 0)
    bad = {order[8], order[9], order[13]}  # step 2 micro-batches 0-1, step 3 micro-batch 1
    items, skip_bad = bad_items(bad)
    train.train(args(tmp_path / "a"), Toy(), items, skip_bad)
    killed = train.train(args(tmp_path / "b", "--stop-after-steps", "3"), Toy(), items, skip_bad)
    assert killed["step"] == 3
    train.train(args(tmp_path / "b", "--resume"), Toy(), items, skip_bad)
    ca, cb = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True) for x in "ab")
    assert all(torch.equal(ca["model"][n], cb["model"][n]) for n in ca["model"])
    assert all(torch.equal(ca["optimizer"]["state"][i][key], cb["optimizer"]["state"][i][key])
               for i in ca["optimizer"]["state"] for key in ("exp_avg", "exp_avg_sq"))
    assert [r.get("loss") for r in metrics(tmp_path / "a")] == [r.get("loss") for r in metrics(tmp_path / "b")]


def test_early_stopping_keeps_the_best(tmp_path):
    toy = Toy(accs=[0.1, 0.3, 0.2, 0.3, 0.25, 0.9])
    end = train.train(toy_args(tmp_path, "--eval-every", "1", "--patience", "3", "--max-steps", "20"), toy,
                      toy_data(), collate, dev_set=toy_data(1))
    # best 0.3 at validation 2 (step 2); 0.2, 0.3 (not better), 0.25 -> 3 without a new best -> stop at step 5
    assert (end["stopped"], end["step"], end["best_step"], end["best_acc"]) == ("early_stop", 5, 2, 0.3)
    assert torch.equal(load_file(tmp_path / "best.safetensors")["lin.weight"], toy.seen[2])
    assert torch.equal(load_file(tmp_path / "last.safetensors")["lin.weight"], toy.lin.weight.detach())
    dev = [r for r in metrics(tmp_path) if r.get("split") == "dev"]
    assert [r["acc"] for r in dev] == pytest.approx([0.1, 0.3, 0.2, 0.3, 0.25])
    assert [r["since_best"] for r in dev] == [0, 0, 1, 2, 3]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    args = toy_args(tmp_path, "--save-every", "2", "--max-steps", "4")
    train.train(args, Toy(), toy_data(), collate)
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert before["state"]["step"] == 4

    def broken_save(obj, f):  # a kill in the middle of writing (runtime.torch_save passes an open file)
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", broken_save)
    args.resume, args.max_steps, args.resume_changes = True, 6, "apply"
    with pytest.raises(KeyboardInterrupt):
        train.train(args, Toy(), toy_data(), collate)
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert after["state"]["step"] == 4 and torch.equal(after["model"]["lin.weight"], before["model"]["lin.weight"])


def test_refuses_to_overwrite_a_run(tmp_path):
    train.train(toy_args(tmp_path, "--max-steps", "2"), Toy(), toy_data(), collate)
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(toy_args(tmp_path, "--max-steps", "2"), Toy(), toy_data(), collate)
    with pytest.raises(ValueError, match="--batch-size: checkpoint 4, this run 8"):
        train.train(toy_args(tmp_path, "--max-steps", "3", "--resume", "--batch-size", "8"), Toy(), toy_data(), collate)


# ----------------------------------------------------------------------------- resume: changed settings, files, layout


def test_resume_with_changed_settings_refuses_and_lists_them(tmp_path):
    """Issue 11.2: a resume with another --lr, --weight-decay, --adam-eps, --adam-betas used to train with
    old_lr x schedule(new) / new_lr and the old optimizer settings, and args.json recorded the new values."""
    train.train(toy_args(tmp_path, "--max-steps", "6", "--save-every", "3", "--stop-after-steps", "4"), Toy(),
                toy_data(), collate)
    new = ["--max-steps", "6", "--lr", "0.02", "--weight-decay", "0.1", "--adam-eps", "1e-6", "--adam-betas", "0.8",
           "0.99", "--resume"]
    with pytest.raises(train.data.UserError) as e:
        train.train(toy_args(tmp_path, *new), Toy(), toy_data(), collate)
    msg = str(e.value)
    for line in ("--lr: checkpoint 0.01, this run 0.02", "--weight-decay: checkpoint 0.05, this run 0.1",
                 "--adam-eps: checkpoint 1e-08, this run 1e-06",
                 "--adam-betas: checkpoint [0.9, 0.999], this run [0.8, 0.99]",
                 "--resume-changes apply"):
        assert line in msg, line
    for fixed in (["--seed", "1"], ["--batch-size", "8"]):  # never changeable, not even with apply
        with pytest.raises(train.data.UserError, match=f"cannot continue.*\n  {fixed[0]}: checkpoint"):
            train.train(toy_args(tmp_path, *new, "--resume-changes", "apply", *fixed), Toy(), toy_data(), collate)
    with pytest.raises(train.data.UserError, match=r"--train: checkpoint '\[16\] entries', this run '\[12\] entries'"):
        train.train(toy_args(tmp_path, *new, "--resume-changes", "apply"), Toy(), toy_data(12), collate)

    args = toy_args(tmp_path, *new, "--resume-changes", "apply")
    train.train(args, Toy(), toy_data(), collate)
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    old = toy_args(tmp_path, "--max-steps", "6")
    for r in rows:  # the new schedule from the resumed step (3) on, exactly; the old one before
        assert r["lr"] == pytest.approx(train.lr_at(r["step"] - 1, args if r["step"] > 3 else old), rel=1e-12), r
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["eps"] == 1e-6 for g in groups)
    record = json.load(open(tmp_path / "args.json"))
    assert record["lr"] == 0.02 and record["resume_history"] == [dict(step=3, changes={
        "adam_betas": dict(old=[0.9, 0.999], new=[0.8, 0.99]), "adam_eps": dict(old=1e-8, new=1e-6),
        "lr": dict(old=0.01, new=0.02), "weight_decay": dict(old=0.05, new=0.1)})]
    event = [r for r in metrics(tmp_path) if r.get("event") == "resume"]
    assert len(event) == 1 and event[0]["step"] == 3 and event[0]["changes"]["lr"] == dict(old=0.01, new=0.02)
    # the next resume compares with the applied values: unchanged flags resume silently
    train.train(toy_args(tmp_path, *new[:-1], "--max-steps", "6", "--resume"), Toy(), toy_data(), collate)


def test_resume_cleans_temporaries_and_reads_a_cut_metrics_line(tmp_path):
    """Issue 11.8 and 11.10: files a killed save leaves (ours `*.tmp<pid>`, safetensors' hidden `.tmpXXXXXX`) are
    removed when a run starts and ends; a metrics.jsonl whose last line a kill cut short resumes; a damaged
    checkpoint.pt is named."""
    common = ["--max-steps", "6", "--save-every", "2"]
    train.train(toy_args(tmp_path / "a", *common), Toy(), toy_data(), collate)
    out = tmp_path / "b"
    train.train(toy_args(out, *common, "--stop-after-steps", "3"), Toy(), toy_data(), collate)
    orphans = {"checkpoint.pt.tmp4242": b"x" * 100, "last.safetensors.tmp77": b"y", "last.safetensors.tmp77.json": b"{",
               ".tmpA1b2C3": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"", ".tmpZZZZZZ": b""}
    kept = {".tmpQwErTy": b"not a safetensors file", "notes.tmp1": b"mine", "checkpoint.pt.tmpx": b"?"}
    for name, content in {**orphans, **kept}.items():
        (out / name).write_bytes(content)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # the killed run's half-written row
    train.train(toy_args(out, *common, "--resume"), Toy(), toy_data(), collate)
    assert set(os.listdir(out)) & set(orphans) == set() and set(kept) <= set(os.listdir(out))
    ra, rb = metrics(tmp_path / "a"), metrics(out)
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]
    assert runtime.clean_temporaries(out, runtime.OWN_FILES) == []
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])  # truncated
    with pytest.raises(train.data.UserError, match=r"--resume: cannot read .*checkpoint\.pt"):
        train.train(toy_args(out, *common, "--max-steps", "8", "--resume"), Toy(), toy_data(), collate)
    with open(out / "metrics.jsonl", "w") as f:
        f.write('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')  # damaged inside: say where
    with pytest.raises(train.data.UserError, match=r"metrics.jsonl: line 2: invalid JSON"):
        runtime.Metrics(str(out), 0, 3)


def test_cuda_rng_state_is_the_current_device_only(monkeypatch):
    """Issue 12 (another GPU layout): only the current device's CUDA RNG state is saved and restored, and a
    machine without a GPU ignores it (the old code raised IndexError with fewer GPUs per process)."""
    s = runtime.rng_state()
    assert s["cuda"] is None  # no GPU here
    runtime.set_rng_state(dict(s, cuda=torch.zeros(16, dtype=torch.uint8)))  # a GPU run's state, resumed on a CPU
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("get_rng_state_all"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set_rng_state_all"))
    saved = runtime.rng_state()
    assert torch.equal(saved["cuda"], torch.full((4,), 7, dtype=torch.uint8))  # one tensor, not a list
    runtime.set_rng_state(saved)
    assert [c.tolist() for c in calls] == [[7] * 4]


def toy_torchrun(tmp_path, out, *flags, nproc=2, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), os.path.join(ROOT, "tests", "toy_objective.py"), "--output-dir", str(out),
           "--batch-size", "4", "--lr", "0.01", "--warmup-start-lr", "0.001", "--min-lr", "0.002", *RUN_FLAGS, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_resume_on_another_number_of_processes_keeps_the_micro_batch(tmp_path):
    """Issue 11.6: a run of 2 processes x 1 item x 2 accumulated, killed after step 3 (checkpoint at 2), resumed
    by 1 process with default flags: the micro-batch stays 1 and the accumulation becomes 4, so the steps are the
    same (up to float summation order); the old code went to micro-batches of 4 and moved the result by ~1e-2.
    Where the numbers do not divide the resume stops and says what would work."""
    common = ["--max-steps", "6", "--save-every", "2", "--warmup-steps", "2"]
    proc = toy_torchrun(tmp_path, tmp_path / "two", *common, "--per-device-batch-size", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = toy_torchrun(tmp_path, tmp_path / "b", *common, "--per-device-batch-size", "1", "--stop-after-steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = toy_args(tmp_path / "b", *common, "--resume")
    train.train(args, Toy(), toy_data(), collate)
    event = [r for r in metrics(tmp_path / "b") if r.get("event") == "resume"]
    assert event == [dict(event="resume", step=2, changes={}, world_size=[2, 1], grad_accum=[2, 4],
                          per_device_batch_size=1)]
    wa, wb = load_file(tmp_path / "two" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    diff = max((wa[n] - wb[n]).abs().max().item() for n in wa)
    print(f"max |2 processes - (2 processes, resumed by 1)| = {diff:.3g}")
    # float summation order only: (g0 + g1) + (g2 + g3) vs ((g0 + g1) + g2) + g3, magnified by Adam's
    # normalisation at most to a few float32 ulps of lr-sized steps (the old behaviour moved it by ~1e-2)
    assert diff <= 1e-6
    # 1 process x micro-batch 4 cannot become 2 processes x micro-batch 4 (global batch 4): stop, naming the fix
    ck = dict(micro_batch=4, grad_accum=1, world_size=1)
    ns = lambda b=None, k=None: argparse.Namespace(batch_size=4, per_device_batch_size=b, grad_accum=k)
    with pytest.raises(train.data.UserError) as e:
        runtime.resume_layout(ns(), 2, ck, "ck.pt")
    assert ("micro-batches of 4 per device (global batch 4 = 4 x 1 accumulation x 1 processes)" in str(e.value)
            and "Resume with 1 processes" in str(e.value) and "--per-device-batch-size N --resume-changes apply"
            in str(e.value))
    assert runtime.resume_layout(ns(), 1, dict(ck, micro_batch=2, grad_accum=2), "ck.pt") == (2, 2)
    assert runtime.resume_layout(ns(), 2, dict(ck, micro_batch=2, grad_accum=2), "ck.pt") == (2, 1)
    assert runtime.resume_layout(ns(b=1), 2, ck, "ck.pt") == (1, 2)  # a given micro-batch (a listed change)
    with pytest.raises(train.data.UserError, match="--grad-accum 2"):
        runtime.resume_layout(ns(k=2), 2, dict(ck, micro_batch=2), "ck.pt")


def test_two_processes_with_an_empty_micro_batch_equal_one_killed_and_resumed(tmp_path):
    """Issue 11.3 under torchrun: at step 2 rank 1's whole micro-batch is unreadable, so rank 1 runs no forward while
    rank 0 does (no collective inside the forward; the loop all-reduces the gradients itself). The result equals one
    process with the same micro-batches killed right before that step and resumed: the same divisor (3 readable
    micro-batches at step 2), the same floats (g + 0 = g)."""
    order = train.epoch_order([16], [1.0], 16, 42, 0)
    bad = [order[10], order[11], order[4]]  # step 2 = items 8..11: rank 1 has 10, 11; step 1: one item of rank 0
    common = ["--max-steps", "4", "--save-every", "2", "--warmup-steps", "2", "--per-device-batch-size", "2"]
    proc = toy_torchrun(tmp_path, tmp_path / "two", *common, "--bad", *map(str, bad))
    assert proc.returncode == 0, proc.stderr[-2000:]
    items, skip_bad = bad_items(set(bad))
    one = lambda *x: toy_args(tmp_path / "one", *common, *x)
    train.train(one("--stop-after-steps", "3"), Toy(), items, skip_bad)  # checkpoint at 2, killed after 3
    train.train(one("--resume"), Toy(), items, skip_bad)
    wa, wb = load_file(tmp_path / "two" / "last.safetensors"), load_file(tmp_path / "one" / "last.safetensors")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    rows = [r for r in metrics(tmp_path / "two") if "lr" in r]
    assert [r["n_bad_audio"] for r in rows] == [0, 1, 2, 0]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics(tmp_path / "one") if "lr" in r],
                                                      rel=1e-12)


def test_a_stuck_rank_ends_the_run_after_dist_timeout(tmp_path):
    """Issue 11.9: rank 1 sleeps 60 s in its forward of step 1; with --dist-timeout 0.05 (3 s) rank 0 stops with a
    message instead of waiting (SALMONN waits 365 days), and torchrun ends the run."""
    import time
    t0 = time.time()
    proc = toy_torchrun(tmp_path, tmp_path / "run", "--dist-timeout", "0.05", "--stall-rank", "1", "--stall-at-step",
                        "1", "--stall-seconds", "60")
    took = time.time() - t0
    assert proc.returncode != 0 and took < 45, (took, proc.stderr[-2000:])
    assert ("toy_objective.py: error: [rank 0] rank 0: a collective did not complete within --dist-timeout 0.05 "
            "minutes: another process is stuck or dead") in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("toy_objective.py: error")[0][-500:]


# ----------------------------------------------------------------------------- stage 1 on the tiny model


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    asr = write_manifest(d, "asr", [dict(id="a1", task="asr", text="hello world"),
                                    dict(id="a2", task="asr", text="the quick brown fox")])
    aac = write_manifest(d, "aac", [dict(id="c1", task="aac", text="a dog barks in the distance")])
    return dict(asr=asr, aac=aac, st=write_manifest(d, "st", ST_ROWS))


def test_pretrain_end_to_end_with_beats(tiny_ckpts, manifests, tmp_path):
    out = tmp_path / "run"
    pretrain.main(["--train", f"{manifests['asr']}:1", f"{manifests['aac']}:0.5", "--output-dir", str(out),
                   "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "1", "--save-every", "2",
                   *tiny_flags(tiny_ckpts["qwen2"], beats=True), *RUN_FLAGS])
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "last.safetensors", "last.safetensors.json"} <= set(
        os.listdir(out))
    args = json.load(open(out / "args.json"))
    assert args["train"][1].endswith("aac.jsonl:0.5") and args["warmup_steps"] == 1
    rows = metrics(out)
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3] and rows[-1]["event"] == "end"
    assert all(math.isfinite(r["ce"]) and r["n_tokens"] > 0 for r in rows if "lr" in r)
    lsm = M.LSM.from_trainable(str(out / "last.safetensors"), verbose=False)  # loads: the next stage's --init
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == 3
    for n, p in lsm.trainable_state().items():
        assert torch.equal(p, ck["model"]["lsm." + n]), n


def test_pretrain_counts_bad_data_over_workers(tiny_ckpts, tmp_path, capsys):
    """Issue 11.11: with --skip-bad a broken line, a missing clip and a clip longer than Whisper's 30 s window are
    counted where they happen (main process, DataLoader workers) and the totals reach metrics.jsonl and stdout."""
    d = tmp_path / "data"
    m = write_manifest(d, "m", [dict(id="a1", task="asr", text="hello world"), dict(id="a2", task="asr", text="one"),
                                dict(id="a3", task="asr", text="the long one")], seconds=[1.0, 1.0, 31.0])
    with open(m, "a") as f:
        f.write('{"id": "broken"\n' + json.dumps(dict(id="a4", task="asr", text="gone", audio="missing.wav")) + "\n")
    out = tmp_path / "run"
    pretrain.main(["--train", m, "--output-dir", str(out), "--batch-size", "4", "--max-steps", "2", "--warmup-steps",
                   "1", "--skip-bad", *tiny_flags(tiny_ckpts["qwen2"]), "--dtype", "float32", "--num-workers", "2",
                   "--log-every", "1"])
    rows = metrics(out)
    end = rows[-1]
    assert end["event"] == "end" and end["bad_lines"] == 1
    assert end["counts"] == {"bad_audio": 2, "truncated": 2}  # 2 epochs of 4 items (one global batch each)
    steps = [r for r in rows if "lr" in r]
    assert [r["n_bad_audio"] for r in steps] == [1, 1] and [r["n_truncated"] for r in steps] == [1, 1]
    assert "1 bad manifest line(s) skipped, 2 unreadable clip read(s) skipped, 2 clip(s) cut" in capsys.readouterr().out


def test_pretrain_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--lr LR peak learning rate [a number > 0] (default: 3e-05)", "(default: 1e-06)", "(default: 1e-05)",
                 "--warmup-steps WARMUP_STEPS linear warm-up steps [an integer >= 0] (default: 9000)", "(default: 80000)",
                 "--weight-decay WEIGHT_DECAY", "(default: 0.05)", "--lora-r LORA_R [an integer >= 1] (default: 8)",
                 "--lora-alpha LORA_ALPHA [an integer >= 1] (default: 32)", "--lora-dropout LORA_DROPOUT [a number in [0, 1)] (default: 0.1)",
                 "--batch-size BATCH_SIZE GLOBAL batch", "(default: 32)", "--resume", "--gradient-checkpointing"):
        assert flag in text, flag


def test_ce_falls_on_a_fixed_batch(tiny_ckpts, manifests, tmp_path):
    """Two ASR items, global batch 2: every step sees the same batch; 50 steps at lr 1e-2. The tiny LLM's frozen
    random LM head (std 0.02, hidden 64) keeps every logit within about +-2, so the CE cannot go far below
    ln(vocab) - 2; the teacher-forced accuracy shows the learning. Measured: CE 6.06 -> 5.52, acc 0 -> 0.6."""
    pretrain.main(["--train", manifests["asr"], "--output-dir", str(tmp_path), "--batch-size", "2",
                   "--max-steps", "50", "--warmup-steps", "5", "--lr", "1e-2", "--min-lr", "1e-3",
                   *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS])
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    ce, acc = [r["ce"] for r in rows], [r["acc"] for r in rows]
    assert len(ce) == 50
    print(f"CE {np.mean(ce[:3]):.3f} -> {np.mean(ce[-5:]):.3f}, acc {np.mean(acc[:3]):.2f} -> {np.mean(acc[-5:]):.2f}")
    assert np.mean(ce[-5:]) < np.mean(ce[:3]) - 0.3 and np.mean(ce[-5:]) < np.mean(ce[20:25])
    assert acc[0] < 0.1 and np.mean(acc[-5:]) > 0.3


def test_kill_and_resume_equals_uninterrupted(tiny_ckpts, manifests, tmp_path):
    """Dropout on (LoRA 0.1, Q-Former 0.1), accumulation 2, 3 epochs of 2 steps: killed after step 3 (checkpoint at
    step 2), resumed, it ends with exactly the weights and optimiser state of the uninterrupted run."""
    common = ["--train", manifests["st"], "--batch-size", "2", "--per-device-batch-size", "1", "--max-steps", "6",
              "--warmup-steps", "2", "--lr", "1e-3", "--save-every", "2", *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS]
    pretrain.main(common + ["--output-dir", str(tmp_path / "a")])
    b = str(tmp_path / "b")
    killed = pretrain.main(common + ["--output-dir", b, "--stop-after-steps", "3"])
    assert killed["step"] == 3 and torch.load(f"{b}/checkpoint.pt", weights_only=True)["state"]["step"] == 2
    pretrain.main(common + ["--output-dir", b, "--resume"])
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(f"{b}/last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    oa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(f"{b}/checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    ra, rb = metrics(tmp_path / "a"), metrics(b)  # the killed run's step-3 row was replaced, not duplicated
    assert [r.get("step") for r in ra] == [r.get("step") for r in rb]
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]


def test_gradient_checkpointing_gives_the_same_training(tiny_ckpts, manifests, tmp_path):
    """--gradient-checkpointing recomputes the LLM layers in backward (dropout masks replayed): same weights."""
    common = ["--train", manifests["st"], "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-3",
              *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS]
    pretrain.main(common + ["--output-dir", str(tmp_path / "a")])
    pretrain.main(common + ["--output-dir", str(tmp_path / "b"), "--gradient-checkpointing"])
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) < 1e-6
    assert json.load(open(tmp_path / "b" / "args.json"))["gradient_checkpointing"] is True
    lsm = M.LSM.from_trainable(str(tmp_path / "b" / "last.safetensors"), verbose=False)
    train.Objective(lsm).enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in lsm.decoder.layers)  # it is really on


def test_torchrun_two_processes_match_one(tiny_ckpts, manifests, tmp_path):
    """2 processes x 2 items (gloo) vs 1 process x 2 accumulated micro-batches of 2, global batch 4, 3 steps:
    the trainable parameters are identical on both ranks (max |difference| exactly 0, from the end record) and
    equal to the single-process run within 1e-6 (measured: exactly equal -- averaging two gradients over ranks
    and accumulating two halves give the same floats)."""
    common = ["--train", manifests["st"], "--batch-size", "4", "--per-device-batch-size", "2", "--max-steps", "3",
              "--warmup-steps", "1", "--lr", "1e-3", *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = str(tmp_path / "two")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "pretrain.py"), *common, "--output-dir", two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 per device x 1 accumulation x 2 process(es)" in proc.stdout
    end = metrics(two)[-1]
    assert end["event"] == "end" and end["step"] == 3 and end["max_param_diff_across_ranks"] == 0.0
    one = tmp_path / "one"
    pretrain.main(common + ["--output-dir", str(one)])
    w1, w2 = load_file(one / "last.safetensors"), load_file(f"{two}/last.safetensors")
    diff = max((w1[n] - w2[n]).abs().max().item() for n in w1)
    print(f"max |single - torchrun| = {diff:.3g}")
    assert diff <= 1e-6
    l1 = [r["loss"] for r in metrics(one) if "lr" in r]
    l2 = [r["loss"] for r in metrics(two) if "lr" in r]
    assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-6)  # the logged loss is the mean over both ranks
