"""select_layers.py (stage 2): ranks and MRR against brute force, a planted case where only some layers keep the
speech-text pairing, and the script end to end on the tiny checkpoints."""
import json
import math
import os
import sys

import pytest
import torch

import model as M
import select_layers as S
from conftest import save_fresh_lsm
from test_train import ST_ROWS, one_thread, write_manifest  # noqa: F401 (fixture)


def brute_force_mrr(D):
    """Sort each row (ties: the true text goes after the wrong ones) and find the true text's position."""
    total = 0.0
    for i in range(len(D)):
        order = sorted(range(len(D)), key=lambda j: (float(D[i, j]), j == i))
        total += 1.0 / (order.index(i) + 1)
    return total / len(D)


def test_mrr_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 30):
        D = torch.rand(n, n, generator=g)
        assert S.mean_reciprocal_rank(D) == pytest.approx(brute_force_mrr(D), rel=1e-12)
    D = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.9], [0.0, 0.0, 0.4]])  # by hand: ranks 1, 2 (tie), 3
    assert S.ranks(D).tolist() == [1, 2, 3]
    assert S.mean_reciprocal_rank(D) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3) == brute_force_mrr(D)
    assert S.mean_reciprocal_rank(torch.ones(4, 4)) == 0.25  # all tied: the true text is ranked last
    assert S.select({0: 0.9, 1: 0.05, 2: 0.051, 3: 0.0}, 0.05) == [0, 2]  # strictly above (eq. 5)


def test_planted_layers_are_exactly_the_selected_ones():
    """Layers 0, 1 and 3: text j = speech j moved a little (pairing kept); layers 2 and 4: texts of other
    pairs (pairing destroyed). 40 pairs of 3-6 speech and 2-5 text vectors in 8 dimensions."""
    g = torch.Generator().manual_seed(0)
    N, d, kept = 40, 8, {0, 1, 3}
    base = [torch.randn(3 + i % 4, d, generator=g) * 3 for i in range(N)]
    speech, text = {}, {}
    for l in range(5):
        speech[l] = [b + 0.1 * torch.randn(b.shape, generator=g) for b in base]
        source = base if l in kept else [base[(i * 7 + 3) % N] for i in range(N)]
        text[l] = [s[:2 + i % 4] + 0.1 * torch.randn(s[:2 + i % 4].shape, generator=g) for i, s in enumerate(source)]
    mrr = S.layer_mrrs(speech, text, rows=16)
    print({l: round(v, 3) for l, v in mrr.items()})
    assert all(mrr[l] > 0.9 for l in kept) and all(mrr[l] < 0.2 for l in {2, 4})
    assert S.select(mrr, 0.5) == sorted(kept)


@pytest.fixture(scope="module")
def stage1(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("select")
    init = save_fresh_lsm(tiny_ckpts["qwen2"], str(d / "last.safetensors"))
    rows = ST_ROWS + [dict(id="c1", task="aac", text="a dog barks in the distance"),
                      dict(id="a1", task="asr", text="she sells sea shells")]
    n_layers = json.load(open(os.path.join(tiny_ckpts["qwen2"]["llm"], "config.json")))["num_hidden_layers"]
    return dict(init=init, manifest=write_manifest(d, "m", rows), n_layers=n_layers)


def test_end_to_end(stage1, tmp_path, capsys):
    res = S.main(["--init", stage1["init"], "--manifest", stage1["manifest"], "--output-dir", str(tmp_path),
                  "--num-pairs", "4", "--threshold", "0.3", "--dtype", "float32", "--num-workers", "0",
                  "--batch-size", "3", "--seed", "1", "--allow-chance-level"])
    out = capsys.readouterr().out
    saved = json.load(open(tmp_path / "layers.json"))
    assert saved["selected"] == res["selected"] and saved["num_pairs"] == 4 and saved["threshold"] == 0.3
    mrr = {int(l): v for l, v in saved["mrr"].items()}
    assert sorted(mrr) == list(range(stage1["n_layers"] + 1))  # layer 0 (embeddings) .. L
    assert all(1 / 4 <= v <= 1 for v in mrr.values())  # 4 pairs: reciprocal ranks in {1, 1/2, 1/3, 1/4}
    assert saved["selected"] == [l for l in sorted(mrr) if mrr[l] > 0.3]
    assert saved["args"]["num_pairs"] == 4
    assert os.path.getsize(tmp_path / "mrr_per_layer.png") > 1000
    assert "layer  MRR" in out and f"selected layers (MRR > 0.3): {saved['selected']}" in out
    assert "chance level" in out and "0.5208 +- 0.1455" in out and saved["chance"]["mrr"] == pytest.approx(25 / 48)
    assert "warning: with 4 pairs the chance-level MRR is 0.5208" in out
    assert saved["counts"] == {"bad_audio": 0, "truncated": 0} and saved["skipped"] == []
    # same seed -> the same pairs and the same numbers; the AAC entry (no transcript) is never sampled
    again = S.main(["--init", stage1["init"], "--manifest", stage1["manifest"], "--output-dir", str(tmp_path / "b"),
                    "--num-pairs", "4", "--threshold", "0.3", "--dtype", "float32", "--num-workers", "0",
                    "--seed", "1", "--allow-chance-level"])
    assert again["mrr"] == pytest.approx(saved["mrr"], rel=1e-9)


def test_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert S.plot({0: 0.5, 1: 0.1}, 0.05, str(tmp_path / "x.png"), "t") is False
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_errors_and_help(stage1, tmp_path, capsys):
    bad = tmp_path / "aac.jsonl"
    bad.write_text(json.dumps(dict(id="c", audio="c.wav", task="aac", text="noise")) + "\n")
    with pytest.raises(ValueError, match="need at least 2 entries with transcripts"):
        S.main(["--init", stage1["init"], "--manifest", str(bad), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        S.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("--num-pairs NUM_PAIRS random pairs N (all if the manifest has fewer) [an integer >= 2] (default: 1000)",
              "--threshold THRESHOLD select layers with MRR above this (eq. 5) [a number in [0, 1)] (default: 0.05)", "--ot-eps",
              "--align-positions {real,all}", "(default: real)", "--ot-cost {sqeuclidean,cosine}",
              "(default: sqeuclidean)"):
        assert s in text, s


def test_alignment_flags_end_to_end(stage1, tmp_path):
    res = S.main(["--init", stage1["init"], "--manifest", stage1["manifest"], "--output-dir", str(tmp_path),
                  "--num-pairs", "4", "--dtype", "float32", "--num-workers", "0", "--seed", "1",
                  "--align-positions", "all", "--ot-cost", "cosine", "--allow-chance-level"])
    saved = json.load(open(tmp_path / "layers.json"))
    assert saved["args"]["align_positions"] == "all" and saved["args"]["ot_cost"] == "cosine"
    assert all(1 / 4 <= v <= 1 for v in saved["mrr"].values()) and saved["selected"] == res["selected"]


def test_chance_level_mrr():
    """Issue 11.7: chance-level MRR H_N / N (1.0 for one pair, 0.75 for two) and its spread, against a simulation of
    random distance matrices; the check refuses where chance + 3 sd reaches the threshold."""
    assert S.chance_mrr(1) == (1.0, 0.0) and S.chance_mrr(2)[0] == 0.75
    assert S.chance_mrr(4)[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    g = torch.Generator().manual_seed(0)
    sims = torch.tensor([S.mean_reciprocal_rank(torch.rand(20, 20, generator=g)) for _ in range(2000)])
    mean, sd = S.chance_mrr(20)
    # iid random distances: the 20 ranks are independent and uniform, so the formulas are exact; the simulated mean
    # of 2000 draws is within 4 standard errors, the simulated sd within 10% (its own sampling error is ~1.6%)
    assert abs(sims.mean().item() - mean) < 4 * sd / math.sqrt(2000)
    assert sims.std().item() == pytest.approx(sd, rel=0.1)
    assert S.chance_within_reach(100, 0.05) and not S.chance_within_reach(1000, 0.05)  # 0.052 vs 0.0075
    n = S.pairs_needed(0.05)
    assert not S.chance_within_reach(n, 0.05) and S.chance_within_reach(n - 1, 0.05)


def test_too_few_pairs_stop_before_the_model_is_loaded(stage1, tmp_path, monkeypatch, capsys):
    """--num-pairs 1 made every MRR exactly 1.0 (all layers selected); with 4 pairs chance is 0.52. Both stop before
    any model is built; --num-pairs 0 or 1 is a usage error."""
    monkeypatch.setattr(M.LSM, "from_trainable", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["--init", stage1["init"], "--manifest", stage1["manifest"], "--output-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"with 4 pairs the chance-level MRR is 0\.5208 \+- 0\.1455 .* within reach of "
                                         r"--threshold 0\.05.*use at least 189 pairs, or --allow-chance-level"):
        S.main(base + ["--num-pairs", "4"])
    for n in ("0", "1"):
        with pytest.raises(SystemExit):
            S.main(base + ["--num-pairs", n])
        assert "argument --num-pairs: expected an integer >= 2" in capsys.readouterr().err


def test_non_finite_distances_are_refused():
    """Issue 11.1: one NaN state made the whole distance matrix NaN and every MRR exactly 1.0 (exit code 0)."""
    g = torch.Generator().manual_seed(0)
    speech = {0: [torch.randn(4, 8, generator=g) for _ in range(5)]}
    text = {0: [torch.randn(3, 8, generator=g) for _ in range(5)]}
    speech[0][2][1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 0: the speech states of 1 pair\(s\) are not finite \(NaN/Inf\), "
                                         r"pairs \['c'\]: refusing to rank"):
        S.layer_mrrs(speech, text, ids=list("abcde"))
    speech[0][2][1, 3] = 0.0
    text[0][4][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the transcript states of 1 pair\(s\) .* pairs \[4\]"):
        S.layer_mrrs(speech, text)
