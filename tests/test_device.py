"""Device guards that need no GPU. The pieces of the model and the losses run on the meta device, whose tensors have
shapes, dtypes and a device but no values: a tensor created on another device (a CPU constant multiplied with a
model tensor) fails there as it would on a GPU, and so does a read of a value on the host. They also compile as one
graph under torch.compile(fullgraph=True) with backends that need no compiler ("eager": Dynamo's trace; "aot_eager":
the backward traced too), which fails on any graph break (a host read, a data-dependent Python branch).

What cannot run on meta, and why (each is on the host by design):
  - speech_forward's cross-entropy selects the target positions with a boolean index (logits over the whole sequence
    and a 152k vocabulary would dominate memory), a data-dependent shape: the test lets the meta kernel of nonzero
    assume every position is selected (torch.fx.experimental._config.meta_nonzero_assume_all_nonzero).
  - transformers' SDPA mask asks the host whether the padding mask is all ones (to skip the mask): the meta test
    runs the LLM with eager attention, whose mask is built on the device.
  - AlignedObjective cuts the speech states to the longest aligned prefix (int(...), one host read); the test runs
    the rest of the OT term, AlignedObjective.ot_distances.
  - CTC (--align ctc): aten::_ctc_loss has no meta kernel and reads the lengths on the host; tests/test_cuda.py
    runs it on a GPU.
  - BEATs checks on the host that every row of a padding mask keeps one whole patch of audio (nonzero().tolist()),
    so the LSM on meta is built without BEATs and BEATs runs on meta without a padding mask.
  - Decoding (generate): transformers' stopping criteria read the finished rows on the host.
Compiled as one graph: the connector and the losses. Not compiled: the splice, which builds its tensors from the
tokenizer's Python lists (host work by nature), and the LLM, which is transformers' own code.
"""
import pytest
import torch
import torch.fx.experimental._config as fx_config

import beats
import joint_train
import model as M
from conftest import TINY_QFORMER, make_batch

META = torch.device("meta")


@pytest.fixture(scope="module")
def meta_lsm(tiny_ckpts):
    """A tiny Whisper-only LSM moved to the meta device, with eager attention in the LLM (see the module docstring)."""
    ck = tiny_ckpts["qwen2"]
    torch.manual_seed(0)
    lsm = M.LSM(ck["whisper"], ck["llm"], None, llm_dtype="float32", verbose=False, **TINY_QFORMER)
    lsm.causal_lm.set_attn_implementation("eager")
    return lsm.to(META), make_batch(ck["whisper"], [1.0, 2.5])


def on_meta(*tensors):
    return all(t.device == META for t in tensors)


def test_connector_on_meta():
    """Window Q-Former, projector and the real-window mask, forward and backward, built on meta."""
    with META:
        qformer, proj = M.WindowQFormer(80, 17, 32, 2, 2, 64), torch.nn.Linear(32, 48)
    x = torch.randn(2, 1500, 80, device=META)
    tokens = proj(qformer(x))
    tokens.sum().backward()
    real = M.real_windows(torch.tensor([16000, 48000], device=META), tokens.shape[1], qformer.window)
    assert tokens.shape == (2, 88, 48) and real.shape == (2, 88) and on_meta(tokens, real, qformer.query.grad)


def test_beats_on_meta():
    """BEATs' fbank (its own autocast guard included) and encoder; without a padding mask (see the docstring)."""
    with META:
        enc = beats.BEATs({**beats.DEFAULTS, **beats.TINY_CFG})
    feats, pad = enc(torch.randn(2, 16000, device=META))
    assert feats.shape[:2] == pad.shape and on_meta(feats, pad)


def test_speech_and_text_forward_on_meta(meta_lsm):
    """The whole speech forward (encoders, Q-Former, projector, splice, LLM, cross-entropy, hidden states) and its
    backward, the text forward and the splice of the transcripts, all on meta from a batch on the CPU."""
    lsm, batch = meta_lsm
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        out = lsm.speech_forward(batch, (0, 2))
    out["loss"].backward()
    assert out["hidden"][2].shape == (2, 88, 64) and on_meta(out["loss"], *out["hidden"].values(), out["speech_mask"])
    assert all(p.grad is not None and p.grad.device == META for p in lsm.trainable_state().values())
    text, text_mask = lsm.text_forward(batch["transcripts"], batch["instructions"], (0, 1))
    assert text[1].shape[:2] == text_mask.shape and on_meta(text[0], text[1], text_mask)
    inp = lsm.splice(lsm._embed_texts(batch["transcripts"]), batch["instructions"], left_pad=True)
    assert on_meta(*inp.values())
    lsm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("align", ["none", "cl"])
def test_objective_on_meta(meta_lsm, align):
    """AlignedObjective's whole forward and backward for the modes without a host read."""
    lsm, batch = meta_lsm
    objective = joint_train.AlignedObjective(lsm, align)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        out = objective(batch)
    out["loss"].backward()
    assert out["loss"].shape == () and on_meta(out["loss"], lsm.proj.weight.grad)
    lsm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_ot_term_on_meta(meta_lsm, cost):
    """The OT term of eq. 6 over two layers (bf16 states, as under autocast), forward and backward."""
    objective = joint_train.AlignedObjective(meta_lsm[0], "ot", (0, 2), ot_cost=cost)
    speech = [torch.randn(3, 20, 64, device=META, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    text = [torch.randn(3, 9, 64, device=META, dtype=torch.bfloat16) for _ in range(2)]
    w = objective.ot_distances(speech, torch.ones(3, 20, dtype=torch.bool, device=META), text,
                               torch.ones(3, 9, dtype=torch.bool, device=META))
    w.sum().backward()
    assert w.shape == (2,) and on_meta(w, speech[0].grad) and speech[0].grad.dtype == torch.bfloat16


def compiled_and_eager(fn, *args):
    """fn(*args) compiled as one graph with aot_eager and run eagerly; both with their input gradients."""
    torch._dynamo.reset()
    results = []
    for f in (torch.compile(fn, backend="aot_eager", fullgraph=True), fn):
        inputs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        out = f(*inputs)
        out.sum().backward()
        results.append((out, [a.grad for a in inputs if a.requires_grad]))
    return results


def test_connector_compiles_as_one_graph():
    """Window Q-Former + projector + real-window mask. Tolerance: the same float32 operations; AOTAutograd's graph
    may only reorder independent ones, so results agree to rounding (measured: identical)."""
    torch.manual_seed(0)
    qformer, proj = M.WindowQFormer(80, 17, 32, 2, 2, 64).eval(), torch.nn.Linear(32, 48)  # eval: no dropout masks
    wav_lens = torch.tensor([16000, 48000])
    connector = lambda x: proj(qformer(x)) * M.real_windows(wav_lens, 88, 17)[..., None]
    (compiled, g1), (eager, g2) = compiled_and_eager(connector, torch.randn(2, 1500, 80, requires_grad=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_losses_compile_as_one_graph(meta_lsm):
    """Cross-entropy at the selected targets, the contrastive loss (one process: in-batch negatives) on masked
    means, and the OT term with both costs (short n_iters: the loop is the same at any length). Tolerances: as
    above, float32 throughout."""
    torch.manual_seed(0)
    mask = torch.arange(20) < torch.tensor([[20], [7], [13]])
    h, t = torch.randn(3, 20, 16, requires_grad=True), torch.randn(3, 20, 16)
    logits, target = torch.randn(30, 50, requires_grad=True), torch.randint(0, 50, (30,))
    pieces = [
        (lambda z: torch.nn.functional.cross_entropy(z, target), logits),
        (lambda z: joint_train.n_pair_loss(M.masked_mean(z, mask), M.masked_mean(t, mask), 0.1), h)]
    for cost in ("sqeuclidean", "cosine"):
        objective = joint_train.AlignedObjective(meta_lsm[0], "ot", (0, 1), ot_cost=cost, ot_iters=6)
        pieces.append((lambda z, o=objective: o.ot_distances([z, 2 * z], mask, [t[:, :9], t[:, 9:18]], mask[:, :9]),
                       h))
    for fn, x in pieces:
        (compiled, g1), (eager, g2) = compiled_and_eager(fn, x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)



def test_initial_weights_do_not_depend_on_the_llm_device(tiny_ckpts, monkeypatch):
    """PEFT draws LoRA's A matrices where the LLM is (CUDA's generator on a GPU). model.redraw_lora draws them again
    on the CPU from a seed taken before the LLM loads, and the CPU generator is restored around PEFT: a PEFT that
    draws from another generator (here: 1000 extra CPU draws) changes none of the initial weights."""
    import peft
    ck = tiny_ckpts["qwen2"]

    def build():
        torch.manual_seed(0)
        lsm = M.LSM(ck["whisper"], ck["llm"], None, llm_dtype="float32", verbose=False, **TINY_QFORMER)
        return lsm.trainable_state(), torch.rand(3)  # the weights, and the CPU generator's state after the build
    (plain, after) = build()
    monkeypatch.setattr(M, "get_peft_model", lambda *a, **kw: (torch.rand(1000), peft.get_peft_model(*a, **kw))[1])
    (other, after_other) = build()
    assert plain.keys() == other.keys() and any("lora_A" in n for n in plain)
    assert all(torch.equal(plain[n], other[n]) for n in plain) and torch.equal(after, after_other)

# ----------------------------------------------------------------------------- start-up on a node


def test_each_rank_binds_its_own_gpu(monkeypatch):
    """torchrun's LOCAL_RANK becomes the current CUDA device before the model is built (model.rank_device), and the
    process group is bound to it (device_id), so nothing of rank 1 lands on GPU 0. CUDA is simulated: the calls
    are recorded."""
    import runtime
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cuda1 = torch.device("cuda", 1)
    assert M.rank_device() == cuda1 and calls == [("set_device", cuda1)]
    assert runtime.init_distributed(5.0) == (1, 2, cuda1)
    assert calls[1] == ("set_device", cuda1) and calls[2][0] == "nccl" and calls[2][1]["device_id"] == cuda1


def test_only_rank_0_prints_the_model_summary(tiny_ckpts, monkeypatch, capsys):
    ck = tiny_ckpts["qwen2"]
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        M.LSM(ck["whisper"], ck["llm"], None, llm_dtype="float32", **TINY_QFORMER)
        assert ("LSM: trainable parameters" in capsys.readouterr().out) == printed, rank


def test_one_training_loader_with_persistent_workers(tmp_path, monkeypatch):
    """Two epochs: one training DataLoader for the whole run, its workers persistent (started once, not once per
    epoch); the weights are those of the run without workers."""
    import train
    from test_train import toy_args
    from toy_objective import Toy, collate, toy_data
    made = []

    class Recording(train.DataLoader):
        def __init__(self, *a, **kw):
            made.append(kw)
            super().__init__(*a, **kw)
    monkeypatch.setattr(train, "DataLoader", Recording)
    weights = {}
    for workers in ("1", "0"):
        made.clear()
        toy = Toy()
        train.train(toy_args(tmp_path / workers, "--num-workers", workers), toy, toy_data(), collate)
        assert len(made) == 1 and made[0]["persistent_workers"] == (workers == "1") and not made[0]["pin_memory"]
        weights[workers] = toy.lin.weight.detach().clone()
    assert torch.equal(weights["1"], weights["0"])
