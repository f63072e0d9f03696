"""The alignment options shared by stages 2, 3 and the evaluation (issue 9.3, 9.4): the cosine ground cost
(model.cost_points) against its definition and the exact assignment, its scale invariance, and --align-positions /
--ot-cost in select_layers.py and evaluate.py on the tiny checkpoints."""
import argparse

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import evaluate
import model as M
import ot
import select_layers as S
from conftest import save_fresh_lsm
from test_train import ST_ROWS, one_thread, write_manifest  # noqa: F401 (fixture)


def w_cost(x, y, xm, ym, cost):
    a, b, scale = M.cost_points(x, y, cost)
    return scale * ot.wasserstein(a, b, xm, ym)


def test_cosine_cost_is_scale_free_and_half_the_normalised_sqeuclidean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g, dtype=torch.float64) * torch.rand(3, 7, 1, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) + 0.5
    xm = torch.arange(7) < torch.tensor([[7], [4], [2]])
    ym = torch.arange(5) < torch.tensor([[3], [5], [1]])
    base = w_cost(x, y, xm, ym, "cosine")
    assert torch.equal(w_cost(4 * x, y, xm, ym, "cosine"), base)  # power of two: bit-identical unit vectors
    # any other scale of one side, or of single states: the unit vectors move by rounding only (float64)
    torch.testing.assert_close(w_cost(3.7 * x, y, xm, ym, "cosine"), base, rtol=1e-9, atol=0)
    torch.testing.assert_close(w_cost(x, 0.01 * y, xm, ym, "cosine"), base, rtol=1e-9, atol=0)
    row_scales = torch.rand(3, 5, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(w_cost(x, row_scales * y, xm, ym, "cosine"), base, rtol=1e-9, atol=0)
    sq = w_cost(x, y, xm, ym, "sqeuclidean")
    assert (w_cost(3.7 * x, y, xm, ym, "sqeuclidean") - sq).abs().min() > 0.1 * sq.abs().min()  # it is not
    # the definition: 1/2 x the squared Euclidean W of the normalised states
    unit = lambda h: h / h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(base, 0.5 * ot.wasserstein(unit(x), unit(y), xm, ym), rtol=1e-12, atol=0)
    # ... which is OT with the cost 1 - cos: equal sizes and uniform masses make the exact OT an assignment
    for n in (1, 4, 9):
        a, b = (torch.randn(n, 16, generator=g, dtype=torch.float64) for _ in range(2))
        C = (1 - unit(a) @ unit(b).T).numpy()
        r, c = linear_sum_assignment(C)
        exact = C[r, c].mean()
        got = w_cost(a[None], b[None], None, None, "cosine").item()
        # ot.py's estimate is within 1.1% of the exact OT in its own POT tests; 2% here
        assert got == pytest.approx(exact, rel=2e-2, abs=1e-9), n
    # gradients flow through the normalisation (the speech side is trained with it)
    xg = x.clone().requires_grad_(True)
    w_cost(xg, y, xm, ym, "cosine").sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad[xm].abs().sum() > 0
    # radial directions do not matter: the gradient is orthogonal to each state
    assert (xg.grad * x).sum(-1)[xm].abs().max() < 1e-9
    with pytest.raises(ValueError, match="--ot-cost"):
        M.cost_points(x, y, "l1")


def test_evaluate_log_wasserstein_takes_the_cost():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    xm, ym = torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    cos = evaluate.log_wasserstein(x, xm, y, ym, cost="cosine")
    torch.testing.assert_close(cos, w_cost(x, y, xm, ym, "cosine").log())
    assert torch.equal(evaluate.log_wasserstein(8 * x, xm, y, ym, cost="cosine"), cos)
    torch.testing.assert_close(evaluate.log_wasserstein(x, xm, y, ym), ot.wasserstein(x, y, xm, ym).log())


def test_select_layers_cosine_mrr_is_blind_to_the_scale_of_one_side():
    """Texts = the speech states moved a little, then every text scaled by its own factor 1..100 (the norm drift the
    cosine cost is for): cosine retrieval is the same as unscaled; squared Euclidean retrieval collapses."""
    g = torch.Generator().manual_seed(0)
    N, d = 24, 8
    base = [torch.randn(3 + i % 3, d, generator=g) for i in range(N)]
    speech = {0: [b + 0.05 * torch.randn(b.shape, generator=g) for b in base]}
    text = {0: [b[:2] + 0.05 * torch.randn(2, d, generator=g) for b in base]}
    scaled = {0: [t * (1 + 99 * k / (N - 1)) for k, t in enumerate(text[0])]}
    cos, cos_scaled = (S.layer_mrrs(speech, t, cost="cosine", rows=8)[0] for t in (text, scaled))
    sq, sq_scaled = (S.layer_mrrs(speech, t, rows=8)[0] for t in (text, scaled))
    print(f"cosine {cos:.3f} / scaled {cos_scaled:.3f}; sqeuclidean {sq:.3f} / scaled {sq_scaled:.3f}")
    assert cos == cos_scaled and cos > 0.9 and sq > 0.8 and sq_scaled < 0.3


@pytest.fixture(scope="module")
def stage1(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("alignment")
    init = save_fresh_lsm(tiny_ckpts["qwen2"], str(d / "last.safetensors"))
    return dict(init=init, manifest=write_manifest(d, "m", ST_ROWS, seconds=[1.0, 2.0, 1.5, 1.25]))


@pytest.mark.parametrize("speech_tokens", ["all", "real"])
def test_positions_in_stage2_and_evaluation(stage1, tiny_ckpts, tmp_path, speech_tokens):
    """collect_states (stage 2) and representations (evaluate.py) keep the positions --align-positions says:
    real = the real windows (1 s -> 3, 2 s -> 6, 1.5 s -> 5, 1.25 s -> 4), all = every position the LLM saw (88, or
    the real windows with --speech-tokens real: then the two are the same, exactly); the alignment degree is the
    log of ot.wasserstein on exactly those states, with --ot-cost."""
    from torch.utils.data import DataLoader
    import data
    from transformers import WhisperFeatureExtractor
    lsm = M.LSM.from_trainable(stage1["init"], verbose=False, speech_tokens=speech_tokens).eval()
    entries = data.read_manifest(stage1["manifest"])
    real = [3, 6, 5, 4]
    seen = [88] * 4 if speech_tokens == "all" else real
    collate = data.Collator(WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"]))
    loader = DataLoader(data.SpeechDataset(entries), batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    states = {}
    for positions, lengths in (("real", real), ("all", seen)):
        speech, text, read = S.collect_states(lsm, loader, [0, 2], lambda: torch.autocast("cpu", enabled=False),
                                              positions)
        assert read["ids"] == [e["id"] for e in entries]
        assert [len(h) for h in speech[0]] == lengths and [len(h) for h in speech[2]] == lengths
        states[positions] = speech
    if speech_tokens == "real":
        assert all(torch.equal(a, b) for a, b in zip(states["real"][2], states["all"][2]))
    logs = {}
    for positions in ("real", "all"):
        for cost in ("sqeuclidean", "cosine"):
            args = argparse.Namespace(instructions=None, batch_size=4, num_workers=0, ot_eps=ot.EPS,
                                      ot_iters=ot.N_ITERS, align_positions=positions, ot_cost=cost, dtype=None)
            recs = evaluate.representations(lsm, entries, [0, 1, 2, 3], [0, 2], args, 0, 1, pooled=False)
            logs[positions, cost] = np.array([r["log_w"][2] for r in recs])
            # by hand on the same padded tensors (ot.wasserstein's float32 value moves by ~4e-4 relative with the
            # padded length of a problem, so the reference keeps speech_forward's padding)
            with torch.no_grad():
                out = lsm.speech_forward(batch, [2])
                t, tm = lsm.text_forward(batch["transcripts"], batch["instructions"], [2])
            mask = out["speech_mask"] if positions == "real" else out["seen_mask"]
            assert mask.sum(1).tolist() == (real if positions == "real" else seen)
            x, y = out["hidden"][2], t[2]
            if cost == "cosine":
                x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
            expected = ((0.5 if cost == "cosine" else 1.0) * ot.wasserstein(x, y, mask, tm)).log().numpy()
            np.testing.assert_allclose(logs[positions, cost], expected, rtol=1e-5, atol=1e-5)
    for cost in ("sqeuclidean", "cosine"):
        if speech_tokens == "real":
            np.testing.assert_array_equal(logs["real", cost], logs["all", cost])
        else:
            assert (logs["real", cost] != logs["all", cost]).all()
