"""joint_train.py (stage 3) on the tiny checkpoints (CPU, float32): eq. 6 as logged, every --align mode end to end,
W falling under --align ot, no gradient into the text side or frozen weights, the baselines' losses by hand,
--layers-from."""
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import config
import joint_train
import model as M
from conftest import make_batch, save_fresh_lsm
from test_train import RUN_FLAGS, ST_ROWS, metrics, one_thread, write_manifest  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    """A stage-1 checkpoint (fresh tiny LSM, Whisper only, float32) and ST train/dev manifests."""
    d = tmp_path_factory.mktemp("joint")
    init = save_fresh_lsm(tiny_ckpts["qwen2"], str(d / "stage1" / "last.safetensors"))
    return dict(init=init, train=write_manifest(d, "train", ST_ROWS), dev=write_manifest(d, "dev", ST_ROWS[:2], seed=1),
                fixed=write_manifest(d, "fixed", ST_ROWS[:2]), folder=d)


def run(setup, out, *flags):
    return joint_train.main(["--init", setup["init"], "--output-dir", str(out), "--batch-size", "2", *RUN_FLAGS,
                             *flags])


@pytest.mark.parametrize("align", ["ot", "ctc", "cl", "none"])
def test_each_align_mode_end_to_end(setup, tmp_path, align):
    end = run(setup, tmp_path, "--train", setup["train"], "--dev", setup["dev"], "--align", align, "--layers", "0", "1",
              "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "1", "--alpha", "0.9")
    assert end["step"] == 2 and end["best_step"] in (1, 2)
    files = set(os.listdir(tmp_path))
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "last.safetensors", "best.safetensors"} <= files
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    dev = [r for r in metrics(tmp_path) if r.get("split") == "dev"]
    assert len(rows) == 2 and len(dev) == 2 and all(0 <= r["acc"] <= 1 and r["n_tokens"] > 0 for r in dev)
    extra = {"ot": ["w_0", "w_1"], "ctc": ["ctc"], "cl": ["cl"], "none": []}[align]
    for r in rows:  # the logged terms add up to the loss (eq. 6 / the baselines with weight 1 - alpha)
        assert all(math.isfinite(r[k]) for k in ["ce"] + extra)
        if align == "ot":
            expected = 0.9 * r["ce"] + 0.1 / 2 * (r["w_0"] + r["w_1"])
        elif align == "none":
            expected = r["ce"]
        else:
            expected = 0.9 * r["ce"] + 0.1 * r[align]
        assert r["loss"] == pytest.approx(expected, rel=1e-5), r
        assert not {"w_0", "w_1", "ctc", "cl"} - set(extra) & set(r)
    args = json.load(open(tmp_path / "args.json"))
    assert args["layers"] == ([0, 1] if align == "ot" else None) and args["align"] == align
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    if align == "ctc":  # the head is trained and saved with the training state, not with the LSM weights
        vocab = M.LSM.from_trainable(setup["init"], verbose=False).causal_lm.get_output_embeddings().out_features
        assert ck["model"]["ctc_head.weight"].shape == (vocab + 1, 64)
        assert not [n for n in load_file(tmp_path / "last.safetensors") if "ctc" in n]
    else:
        assert not [n for n in ck["model"] if "ctc" in n]


def test_w_falls_with_align_ot(setup, tmp_path):
    """The paper's alpha 0.99 (OT weight 0.01), layers 0 and 1, a fixed batch of 2, 20 steps at lr 1e-3.
    Measured: W_0 20.0 -> ~5, W_1 20.4 -> ~5, CE 6.09 -> 5.8."""
    run(setup, tmp_path, "--train", setup["fixed"], "--layers", "0", "1", "--max-steps", "20", "--warmup-steps", "3",
        "--lr", "1e-3", "--min-lr", "1e-4")
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    for key in ("w_0", "w_1", "ce"):
        first, last = rows[0][key], np.mean([r[key] for r in rows[-3:]])
        print(f"{key}: {first:.3f} -> {last:.3f}")
        assert last < first
    assert np.mean([r["w_0"] for r in rows[-3:]]) < 0.5 * rows[0]["w_0"]
    assert np.mean([r["w_1"] for r in rows[-3:]]) < 0.5 * rows[0]["w_1"]


def test_eq6_by_hand(setup, tiny_ckpts):
    """AlignedObjective's loss = alpha CE + (1 - alpha)/|I| sum_l W_l, W_l = batch mean of ot.wasserstein on the real
    speech windows vs the transcript states, computed here layer by layer (AlignedObjective batches the layers in one
    call)."""
    import ot
    lsm = M.LSM.from_trainable(setup["init"], verbose=False).eval()  # eval: no dropout, so both passes agree
    batch = make_batch(tiny_ckpts["qwen2"]["whisper"], [2.0, 1.0, 1.5])
    obj = joint_train.AlignedObjective(lsm, "ot", layers=(0, 2, 3), alpha=0.9).eval()
    with torch.no_grad():
        got = obj(batch)
        out = lsm.speech_forward(batch, (0, 2, 3))
        text, tmask = lsm.text_forward(batch["transcripts"], batch["instructions"], (0, 2, 3))
    assert out["speech_mask"].sum(1).tolist() == [6, 3, 5]
    w = {l: ot.wasserstein(out["hidden"][l], text[l], out["speech_mask"], tmask).mean().item() for l in (0, 2, 3)}
    for l in (0, 2, 3):
        assert got[f"w_{l}"].item() == pytest.approx(w[l], rel=1e-4), l  # float32 value noise, see the torchrun test
    assert got["loss"].item() == pytest.approx(0.9 * got["ce"].item() + 0.1 / 3 * sum(w.values()), rel=1e-5)


def test_no_gradient_into_text_side_or_frozen_weights(setup, tiny_ckpts):
    lsm = M.LSM.from_trainable(setup["init"], verbose=False)
    with torch.no_grad():  # LoRA B starts at 0: move it so LoRA A gets gradients too
        for n, p in lsm.trainable_state().items():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    obj = joint_train.AlignedObjective(lsm, "ot", layers=(0, 1), alpha=0.99).train()
    text_states = []
    real_text_forward = lsm.text_forward

    def spy(*a, **kw):
        hidden, mask = real_text_forward(*a, **kw)
        text_states.extend(hidden.values())
        return hidden, mask
    lsm.text_forward = spy
    batch = make_batch(tiny_ckpts["qwen2"]["whisper"], [2.0, 1.5])
    out = obj(batch)
    out["loss"].backward()
    assert len(text_states) == 2 and all(not h.requires_grad and h.grad_fn is None for h in text_states)
    for name, p in obj.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    lora = [p.grad for n, p in obj.named_parameters() if "lora_" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in lora)
    # with alpha = 0 and layer 0 only, the loss is W_0 between the projector output and frozen token embeddings:
    # nothing of it reaches LoRA (it would through the text side, were that not detached, for deeper layers)
    obj = joint_train.AlignedObjective(lsm, "ot", layers=(0,), alpha=0.0).train()
    obj.zero_grad(set_to_none=True)
    obj(batch)["loss"].backward()
    assert all(p.grad is None or (p.grad == 0).all() for n, p in obj.named_parameters() if "lora_" in n)
    assert lsm.proj.weight.grad.abs().sum() > 0


def test_n_pair_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t, tau = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), 0.1
    expected = 0.0
    for i in range(3):
        sims = [float(s[i] @ t[j] / (s[i].norm() * t[j].norm())) / tau for j in range(3)]
        expected += -(sims[i] - math.log(sum(math.exp(x) for x in sims))) / 3
    assert joint_train.n_pair_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
    x = torch.arange(12.0).view(2, 3, 2)
    mean = M.masked_mean(x, torch.tensor([[True, True, False], [True, False, False]]))
    assert mean.tolist() == [[1.0, 2.0], [6.0, 7.0]]


def test_ctc_uses_real_windows_and_transcript_ids(setup, tiny_ckpts, monkeypatch):
    lsm = M.LSM.from_trainable(setup["init"], verbose=False)
    obj = joint_train.AlignedObjective(lsm, "ctc", alpha=0.5)
    seen = {}

    def fake_ctc(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity):
        seen.update(shape=tuple(log_probs.shape), targets=targets.tolist(), inputs=input_lengths.tolist(),
                    lengths=target_lengths.tolist(), blank=blank)
        return log_probs.sum() * 0
    monkeypatch.setattr(joint_train.F, "ctc_loss", fake_ctc)
    batch = make_batch(tiny_ckpts["qwen2"]["whisper"], [2.0, 1.5], transcripts=["hello world", "a dog"])
    obj(batch)
    ids = [lsm.tokenizer(t, add_special_tokens=False).input_ids for t in ["hello world", "a dog"]]
    assert seen["targets"] == ids[0] + ids[1] and seen["lengths"] == [len(ids[0]), len(ids[1])]
    assert seen["inputs"] == [6, 5]  # 32000 / 5440 -> 6 real windows, 24000 / 5440 -> 5
    assert seen["blank"] == obj.vocab and seen["shape"] == (88, 2, obj.vocab + 1)


def test_layers_from_and_flag_errors(setup, tmp_path, capsys):
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"mrr": {"0": 0.4, "1": 0.01, "2": 0.2, "3": 0.0}, "selected": [0, 2]}))
    out = tmp_path / "run"
    run(setup, out, "--train", setup["fixed"], "--layers-from", str(layers), "--max-steps", "1", "--warmup-steps", "1")
    assert json.load(open(out / "args.json"))["layers"] == [0, 2]
    assert {"w_0", "w_2"} <= set(metrics(out)[0]) and "w_1" not in metrics(out)[0]
    with pytest.raises(SystemExit):
        run(setup, tmp_path / "x", "--train", setup["fixed"], "--layers", "0", "--layers-from", str(layers))
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(setup, tmp_path / "y", "--train", setup["fixed"])
    assert "--align ot needs --layers" in capsys.readouterr().err
    layers.write_text(json.dumps({"selected": []}))
    with pytest.raises(ValueError, match="no layer passed the threshold"):
        run(setup, tmp_path / "z", "--train", setup["fixed"], "--layers-from", str(layers))
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        run(setup, tmp_path / "w", "--train", setup["fixed"], "--layers", "0", "7")


def test_help_shows_paper_defaults(capsys):
    with pytest.raises(SystemExit):
        joint_train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("--alpha ALPHA CE weight; the alignment weight is 1 - alpha (eq. 6) [a number in [0, 1]] (default: 0.99)",
              "--warmup-steps WARMUP_STEPS linear warm-up steps [an integer >= 0] (default: 3000)",
              "--eval-every EVAL_EVERY validate every N steps [an integer >= 1] (default: 3000)", "(default: 4)",
              "--align {ot,ctc,cl,none}", "(default: ot)", "--lr LR peak learning rate [a number > 0] (default: 3e-05)",
              "--batch-size BATCH_SIZE GLOBAL batch", "--lora-r LORA_R [an integer >= 1] (default: 8)", "--ot-eps", "--ot-iters",
              "--align-positions {real,all}", "(default: real)", "--ot-cost {sqeuclidean,cosine}",
              "(default: sqeuclidean)", "--beats-unsafe-load"):
        assert s in text, s


def test_model_flags_on_the_command_line_override_the_checkpoint():
    base = ["--init", "x.safetensors", "--train", "t.jsonl", "--output-dir", "o", "--layers", "0"]
    p = joint_train.parser()
    args = p.parse_args(base + ["--llm-dtype", "bfloat16", "--lora-dropout", "0.0"])
    # bfloat16 is the flag's default: given explicitly it must still override the checkpoint's float32
    assert config.model_overrides(joint_train.parser, base + ["--llm-dtype", "bfloat16", "--lora-dropout",
                                                                         "0.0"], args) == dict(llm_dtype="bfloat16",
                                                                                               lora_dropout=0.0)
    assert config.model_overrides(joint_train.parser, base, p.parse_args(base)) == {}
    args = p.parse_args(base + ["--no-beats"])
    assert config.model_overrides(joint_train.parser, base + ["--no-beats"], args) == dict(beats=None)


def test_torchrun_two_processes_with_accumulation_and_validation(setup, tmp_path):
    """--align ot under torchrun with gradient accumulation (gradients all-reduced once per step) and validation split
    over ranks: 2 processes x 1 item x 2 accumulated vs 1 process x 1 item x 4 accumulated (global batch 4, 3 steps).
    Identical weights on both ranks (exactly) and equal to the single process within 2e-5 = 2% of one Adam step at
    lr 1e-3 (measured: 4.9e-6). Not exact: each rank sums its 2 micro-batch gradients and the loop then sums the
    ranks, where one process adds 4 in a row -- another float summation order, which Adam's per-element
    normalisation magnifies. The dev accuracy and loss (all-reduced token sums) agree as well."""
    import subprocess
    import sys
    from test_train import ROOT, free_port
    common = ["--init", setup["init"], "--train", setup["train"], "--dev", setup["dev"], "--layers", "0", "1",
              "--batch-size", "4", "--per-device-batch-size", "1", "--max-steps", "3", "--warmup-steps", "1",
              "--eval-every", "2", "--lr", "1e-3", *RUN_FLAGS]
    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "joint_train.py"), *common, "--output-dir", two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 per device x 2 accumulation x 2 process(es)" in proc.stdout
    one = str(tmp_path / "one")
    joint_train.main(common + ["--output-dir", one])
    end = metrics(two)[-1]
    assert end["event"] == "end" and end["max_param_diff_across_ranks"] == 0.0
    w1, w2 = load_file(f"{one}/last.safetensors"), load_file(f"{two}/last.safetensors")
    diff = max((w1[n] - w2[n]).abs().max().item() for n in w1)
    print(f"max |single - torchrun| = {diff:.3g}")
    assert diff <= 2e-5
    dev1 = [r for r in metrics(one) if r.get("split") == "dev"]
    dev2 = [r for r in metrics(two) if r.get("split") == "dev"]
    assert [r["step"] for r in dev1] == [r["step"] for r in dev2] == [2, 3]
    for a, b in zip(dev1, dev2):
        assert a["n_tokens"] == b["n_tokens"] and a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], 1e-5)
    rows1, rows2 = [r for r in metrics(one) if "lr" in r], [r for r in metrics(two) if "lr" in r]
    # steps 1-2 start from equal weights. At step 3 the weights differ by ~5e-6 and W (about 17) by up to 4e-4
    # relative: in float32, ot.wasserstein's value moves by ~1e-4 relative for any 1e-6 change of its inputs
    # (cost rounding divided by eps = 1e-3 x std(C); float64: 2e-7), so W gets a looser tolerance there.
    for a, b in zip(rows1, rows2):
        for key in ("loss", "ce", "w_0", "w_1"):
            tol = 1e-6 if a["step"] < 3 else (1e-3 if key.startswith("w_") else 5e-5)
            assert a[key] == pytest.approx(b[key], rel=tol), (a["step"], key)


@pytest.mark.parametrize("speech_tokens", ["all", "real"])
def test_align_positions_and_ot_cost_by_hand(setup, tiny_ckpts, speech_tokens):
    """W_l of every (--align-positions, --ot-cost) against ot.wasserstein by hand: positions real = the windows over
    real audio (6, 3, 5 of 88 for 2, 1, 1.5 s), all = every speech position the LLM saw (88 each with --speech-tokens
    all; with --speech-tokens real the LLM sees only the real windows, so the two are the same, exactly); cost
    cosine = 1/2 W of the L2-normalised states."""
    import ot
    lsm = M.LSM.from_trainable(setup["init"], verbose=False, speech_tokens=speech_tokens).eval()
    batch = make_batch(tiny_ckpts["qwen2"]["whisper"], [2.0, 1.0, 1.5])
    with torch.no_grad():
        out = lsm.speech_forward(batch, (0, 2))
        text, tmask = lsm.text_forward(batch["transcripts"], batch["instructions"], (0, 2))
    real, seen = out["speech_mask"], out["seen_mask"]
    assert real.sum(1).tolist() == [6, 3, 5]
    assert seen.sum(1).tolist() == ([88, 88, 88] if speech_tokens == "all" else [6, 3, 5])
    unit = lambda h: h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    got = {}
    for positions in ("real", "all"):
        for cost in ("sqeuclidean", "cosine"):
            obj = joint_train.AlignedObjective(lsm, "ot", layers=(0, 2), alpha=0.9, align_positions=positions,
                                               ot_cost=cost)
            with torch.no_grad():
                res = obj.eval()(batch)
            mask = real if positions == "real" else seen
            n = int(mask.sum(1).max())  # as AlignedObjective: the positions after the last aligned one are cut
            for l in (0, 2):
                x, y, mask = out["hidden"][l][:, :n], text[l], mask[:, :n]
                expected = (ot.wasserstein(x, y, mask, tmask) if cost == "sqeuclidean" else
                            0.5 * ot.wasserstein(unit(x), unit(y), mask, tmask)).mean().item()
                assert res[f"w_{l}"].item() == pytest.approx(expected, rel=1e-4), (positions, cost, l)
                got[positions, cost, l] = res[f"w_{l}"].item()
    for cost in ("sqeuclidean", "cosine"):
        for l in (0, 2):
            if speech_tokens == "real":
                assert got["real", cost, l] == got["all", cost, l]
            else:  # 82-85 more windows per clip (how much W moves depends on the model: checked by hand above)
                assert got["real", cost, l] != got["all", cost, l], (cost, l)
    with pytest.raises(ValueError, match="--align-positions"):
        joint_train.AlignedObjective(lsm, "ot", layers=(0,), align_positions="some")


def test_flags_reach_args_json(setup, tmp_path):
    run(setup, tmp_path, "--train", setup["fixed"], "--layers", "0", "--max-steps", "1", "--warmup-steps", "1",
        "--align-positions", "all", "--ot-cost", "cosine")
    args = json.load(open(tmp_path / "args.json"))
    assert args["align_positions"] == "all" and args["ot_cost"] == "cosine"
    assert math.isfinite(metrics(tmp_path)[0]["w_0"]) and metrics(tmp_path)[0]["w_0"] <= 2.0  # 1 - cos <= 2


def _cl_rank(rank, world, port, s_all, t_all, sizes, tau, folder):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lo = sum(sizes[:rank])
        if sizes[rank] == 0:  # a micro-batch with no readable item: no forward, skip_batch's zero rows instead
            joint_train.gather_rows(torch.zeros(0, s_all.shape[1], dtype=s_all.dtype))
            return
        s = s_all[lo:lo + sizes[rank]].clone().requires_grad_(True)
        loss = joint_train.n_pair_loss(s, t_all[lo:lo + sizes[rank]], tau)
        loss.backward()
        torch.save(dict(loss=loss.detach(), grad=s.grad), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 3), (2, 3), (3, 0)])
def test_contrastive_negatives_come_from_the_global_batch(tmp_path, sizes):
    """2 gloo ranks: each speech item is contrasted with the texts of both ranks. Equal shards: the mean of the ranks'
    losses is the loss of one process on the joined batch, and (DDP averages the ranks' gradients) 1/2 x each rank's
    gradient is the joined loss's gradient for its rows. Unequal shards (a --skip-bad batch): each rank's loss is the
    mean of its items' terms of the joined batch; a rank with no item at all takes part through
    AlignedObjective.skip_batch's zero rows (else the other rank would wait in its all_gather forever). float64
    throughout; the sums differ only in order (1e-12)."""
    import torch.multiprocessing as mp
    from test_train import free_port
    g = torch.Generator().manual_seed(0)
    N, tau = sum(sizes), 0.1
    s_all, t_all = (torch.randn(N, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mp.start_processes(_cl_rank, args=(2, free_port(), s_all, t_all, list(sizes), tau, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) if sizes[r] else None for r in range(2)]
    s = s_all.clone().requires_grad_(True)
    sim = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(t_all, dim=-1).T / tau
    terms = torch.nn.functional.cross_entropy(sim, torch.arange(N), reduction="none")  # per item, global negatives
    joined = joint_train.n_pair_loss(s, t_all, tau)  # one process: in-batch negatives = the joined batch
    assert joined.item() == pytest.approx(terms.mean().item(), rel=1e-12)
    bounds = [(0, sizes[0]), (sizes[0], N)]
    for r, (lo, hi) in enumerate(bounds):
        if sizes[r]:
            assert ranks[r]["loss"].item() == pytest.approx(terms[lo:hi].mean().item(), rel=1e-12), r
    if sizes[0] == sizes[1]:
        assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(joined.item(), rel=1e-12)
        joined.backward()
        for r, (lo, hi) in enumerate(bounds):
            torch.testing.assert_close(ranks[r]["grad"] / 2, s.grad[lo:hi], rtol=1e-10, atol=1e-14)
    # with in-rank negatives only (the old behaviour) rank 0's loss would be another number
    if sizes[1]:
        local = torch.nn.functional.cross_entropy(sim[:sizes[0], :sizes[0]], torch.arange(sizes[0]))
        assert abs(local.item() - ranks[0]["loss"].item()) > 1e-3
