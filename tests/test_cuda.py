"""The GPU path (`pytest -m cuda`; skipped without CUDA): ot.py under bf16 autocast, one stage-1 step, one stage-3
step per --align mode, select_layers.py and evaluate.py (greedy and beam 4, BLEU) on the tiny models with a bf16
LLM under bf16 autocast on one GPU, and a kill-and-resume on the GPU. Each is compared with the same run on the CPU,
in this process: the scripts pick their device with torch.cuda.is_available(), patched to False for the CPU run.

Tolerances, from what the code guarantees:
  - BF16_TOL = 2^-5 relative (tests/test_precision.py says why): the CPU and the GPU round the same bf16 values in
    different orders and with different kernels, each rounding off by at most 2^-9.
  - ot.py works in float32 from the same inputs on both devices; 100 Sinkhorn iterations of rounding: 1e-3 relative.
  - After AdamW steps from the same weights, two runs whose gradients differ by rounding differ per weight by at
    most 2 x the largest AdamW step, lr (1 - beta1) / sqrt(1 - beta2) = 3.17 lr (Kingma & Ba 2015, section 2.1),
    per step; weight decay moves both alike.
  - The CPU and the GPU draw dropout masks from different generators: the compared runs train without dropout
    (F.dropout patched to the identity); the initial weights are the same on both (model.redraw_lora).
  - Decoding from a random tiny LLM is an argmax over nearly equal logits, so the hypotheses may differ by device:
    the check is that both decode every item and that the BLEU is SacreBLEU's on each run's own hypotheses.
  - On CUDA the backward of the target selection and of the gather at the speech positions add with atomics, so a
    resumed run equals an uninterrupted one up to rounding (docs/gpu.md), within the AdamW bound above.
"""
import contextlib
import math

import numpy as np
import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

import evaluate as E
import joint_train
import ot
import pretrain
import select_layers as S
from conftest import save_fresh_lsm
from test_precision import ZH_ROWS
from test_train import metrics, write_manifest

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = 2 ** -5
LR = 1e-4
ADAM_STEP = LR * 0.1 / math.sqrt(1 - 0.999)  # the largest AdamW step, 3.17 lr
BF16 = ["--llm-dtype", "bfloat16", "--dtype", "bfloat16", "--log-every", "1"]


@pytest.fixture
def on_cpu(monkeypatch):
    """Inside `with on_cpu():` every script runs on the CPU (torch.cuda.is_available() is False)."""

    @contextlib.contextmanager
    def cpu():
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)
            yield
    return cpu


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    ck = tiny_ckpts["qwen2"]
    return dict(init=save_fresh_lsm(ck, str(d / "stage1" / "last.safetensors")), ck=ck,
                st=write_manifest(d, "st", ZH_ROWS), folder=d)  # zh: no MeCab needed for BLEU


@pytest.fixture
def no_dropout(monkeypatch):
    """Dropout off everywhere: nn.Dropout (LoRA, Q-Former hidden states) and SDPA's attention dropout (Q-Former)."""
    F = torch.nn.functional
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **{**kw, "dropout_p": 0.0}))


def close_weights(a, b, steps):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for n in wa:
        diff = (wa[n].float() - wb[n].float()).abs().max().item()
        assert diff <= 2 * ADAM_STEP * steps + 1e-6, (n, diff)


def step_rows(folder):
    return [r for r in metrics(folder) if "lr" in r]


def test_ot_bf16_autocast_and_pairwise_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 88, 256, generator=g).bfloat16(), torch.randn(8, 40, 256, generator=g).bfloat16()
    x_mask = torch.arange(88) < torch.randint(20, 89, (8, 1), generator=g)
    out = {}
    for dev in ("cpu", "cuda"):
        xd = x.detach().to(dev).requires_grad_(True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            w = ot.wasserstein(xd, y.to(dev), x_mask.to(dev), None)
        w.sum().backward()
        assert w.dtype == torch.float32 and xd.grad.dtype == torch.bfloat16 and torch.isfinite(w).all()
        D = ot.pairwise_wasserstein(x.to(dev), y.to(dev), x_mask.to(dev), None, chunk_size=16)
        out[dev] = (w.cpu(), xd.grad.float().cpu(), D.cpu())
    (w0, g0, D0), (w1, g1, D1) = out["cpu"], out["cuda"]
    torch.testing.assert_close(w1, w0, rtol=1e-3, atol=0)
    torch.testing.assert_close(D1, D0, rtol=1e-3, atol=0)
    assert (g1 - g0).norm() <= BF16_TOL * g0.norm()  # the gradient is returned in bf16: rounded on both sides


def test_stage1_step_matches_the_cpu(setup, tmp_path, on_cpu, no_dropout):
    """One step, with a DataLoader worker (pinned memory, non-blocking copies on the GPU)."""
    ck = setup["ck"]
    argv = ["--train", setup["st"], "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "1", "--lr", str(LR),
            "--whisper", ck["whisper"], "--llm", ck["llm"], "--no-beats", "--qformer-hidden", "32", "--qformer-heads",
            "2", "--qformer-ffn", "64", "--num-workers", "1", *BF16]
    pretrain.main(argv + ["--output-dir", str(tmp_path / "gpu")])
    with on_cpu():
        pretrain.main(argv + ["--output-dir", str(tmp_path / "cpu")])
    (g,), (c,) = step_rows(tmp_path / "gpu"), step_rows(tmp_path / "cpu")
    assert g["loss"] == pytest.approx(c["loss"], rel=BF16_TOL)
    close_weights(tmp_path / "gpu" / "last.safetensors", tmp_path / "cpu" / "last.safetensors", 1)


@pytest.mark.parametrize("align", ["ot", "ctc", "cl", "none"])
def test_stage3_step_matches_the_cpu(setup, tmp_path, on_cpu, no_dropout, align):
    argv = ["--init", setup["init"], "--train", setup["st"], "--batch-size", "2", "--align", align, "--layers", "0",
            "1", "--alpha", "0.9", "--max-steps", "1", "--warmup-steps", "1", "--lr", str(LR), "--num-workers", "0",
            *BF16]
    joint_train.main(argv + ["--output-dir", str(tmp_path / "gpu")])
    with on_cpu():
        joint_train.main(argv + ["--output-dir", str(tmp_path / "cpu")])
    (g,), (c,) = step_rows(tmp_path / "gpu"), step_rows(tmp_path / "cpu")
    for key in ["loss", "ce"] + {"ot": ["w_0", "w_1"], "ctc": ["ctc"], "cl": ["cl"], "none": []}[align]:
        assert math.isfinite(g[key]) and g[key] == pytest.approx(c[key], rel=BF16_TOL), key
    close_weights(tmp_path / "gpu" / "last.safetensors", tmp_path / "cpu" / "last.safetensors", 1)


def test_select_layers_matches_the_cpu(setup, tmp_path, on_cpu):
    """4 pairs: each reciprocal rank is 1, 1/2, 1/3 or 1/4; two nearly tied distances may swap between devices, which
    moves one reciprocal rank by at most 3/4 and the MRR by at most 3/16 per swap: allowed one swap per layer."""
    argv = ["--init", setup["init"], "--manifest", setup["st"], "--num-pairs", "4", "--threshold", "0.3",
            "--llm-dtype", "bfloat16", "--dtype", "bfloat16", "--num-workers", "0", "--allow-chance-level"]
    gpu = S.main(argv + ["--output-dir", str(tmp_path / "gpu"), "--device", "cuda"])
    with on_cpu():
        cpu = S.main(argv + ["--output-dir", str(tmp_path / "cpu"), "--device", "cpu"])
    assert gpu["mrr"].keys() == cpu["mrr"].keys()
    for layer, v in gpu["mrr"].items():
        assert 1 / 4 <= v <= 1 and abs(v - cpu["mrr"][layer]) <= 3 / 16 + 1e-9, layer


@pytest.mark.parametrize("beams", [1, 4])
def test_evaluate_decodes_and_scores(setup, tmp_path, on_cpu, beams):
    argv = ["--ckpt", setup["init"], "--manifest", setup["st"], "--llm-dtype", "bfloat16", "--mode", "st", "mt",
            "--alignment", "0", "1", "--num-pairs", "4", "--num-beams", str(beams), "--max-new-tokens", "6",
            "--batch-size", "2", "--num-workers", "0"]
    gpu = E.main(argv + ["--output-dir", str(tmp_path / "gpu")])
    with on_cpu():
        cpu = E.main(argv + ["--output-dir", str(tmp_path / "cpu")])
    for run in (gpu, cpu):
        for mode in ("st", "mt"):
            records = run["records"][mode]
            assert len(records) == len(ZH_ROWS) and all(isinstance(r["hypothesis"], str) for r in records)
            for lang, score in run["bleu"][mode].items():
                mine = [r for r in records if r["tgt_lang"] == lang]
                ref = sacrebleu.corpus_bleu([r["hypothesis"] for r in mine], [[r["reference"] for r in mine]],
                                            tokenize=E.bleu_tokenizer(lang)).score
                assert score["score"] == pytest.approx(ref, abs=1e-9), (mode, lang)
    for layer in ("0", "1"):  # the alignment degree is log W: a relative error of W
        assert abs(gpu["alignment"]["log_w"][layer] - cpu["alignment"]["log_w"][layer]) < BF16_TOL, layer


def test_kill_and_resume_on_the_gpu(setup, tmp_path):
    """Killed after step 3 (checkpoint at step 2), resumed: the weights of the uninterrupted run, up to rounding."""
    ck = setup["ck"]
    common = ["--train", setup["st"], "--batch-size", "2", "--per-device-batch-size", "1", "--max-steps", "6",
              "--warmup-steps", "2", "--lr", str(LR), "--save-every", "2", "--whisper", ck["whisper"], "--llm",
              ck["llm"], "--no-beats", "--qformer-hidden", "32", "--qformer-heads", "2", "--qformer-ffn", "64",
              "--num-workers", "0", *BF16]
    pretrain.main(common + ["--output-dir", str(tmp_path / "a")])
    b = str(tmp_path / "b")
    assert pretrain.main(common + ["--output-dir", b, "--stop-after-steps", "3"])["step"] == 3
    pretrain.main(common + ["--output-dir", b, "--resume"])
    close_weights(tmp_path / "a" / "last.safetensors", f"{b}/last.safetensors", 6)
    ra, rb = step_rows(tmp_path / "a"), step_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    assert np.allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=BF16_TOL, atol=0)
