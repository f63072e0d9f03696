"""model.py on tiny random checkpoints (CPU, float32 unless said): shapes, prompt splicing, hidden states,
trainable set, save/load, generation."""
import argparse
import contextlib

import pytest
import torch
import torch.nn as nn

import config
import model as M
from conftest import TINY_QFORMER, make_batch

INSTR = "Translate the speech into Chinese."
FAMILIES = ["qwen2", "llama"]
_CACHE = {}


def build(ckpts, family="qwen2", beats=True, seed=0, **kw):
    """A fresh tiny LSM (float32 LLM unless llm_dtype is given), eval mode."""
    p = ckpts[family]
    torch.manual_seed(seed)
    kw = {"llm_dtype": "float32", **TINY_QFORMER, **kw}
    return M.LSM(p["whisper"], p["llm"], p["beats"] if beats else None, verbose=False, **kw).eval()


def shared(ckpts, family="qwen2"):
    """One model per family for tests that do not modify it."""
    if family not in _CACHE:
        _CACHE[family] = build(ckpts, family)
    return _CACHE[family]


@pytest.fixture(scope="module")
def batch5(tiny_ckpts):
    """5 s + 3 s clips."""
    return make_batch(tiny_ckpts["qwen2"]["whisper"], [5.0, 3.0])


@contextlib.contextmanager
def lm_head_bias(lsm, token_id, value):
    """Temporarily add `value` to the logit of `token_id` at every step (forces or forbids it)."""
    causal = lsm.causal_lm
    head = causal.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True).to(head.weight.dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[token_id] = value
    causal.set_output_embeddings(biased)
    try:
        yield
    finally:
        causal.set_output_embeddings(head)


def perturb_trainable(lsm, scale=0.05, seed=1):
    """Move every trainable parameter off its init (LoRA B starts at zero, LayerNorms at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lsm.trainable_state().values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# ----------------------------------------------------------------------------- windows


def test_window_geometry():
    assert M.window_frames(0.333333) == 17
    assert M.SAMPLES_PER_FRAME == 320
    # window k starts at sample 17 * 320 * k = 5440 k; 5 s = 80000 samples -> k = 0..14 real (14 * 5440 = 76160)
    lens = torch.tensor([80000, 480000, 16000, 81600, 81601, 5440, 5441])
    real = M.real_windows(lens, 88, 17)
    assert real.sum(1).tolist() == [15, 88, 3, 15, 16, 1, 2]
    assert real[0, :15].all() and not real[0, 15:].any()  # a prefix of the windows


def test_30s_gives_88_tokens_and_5s_gives_15_real_windows(tiny_ckpts):
    lsm = shared(tiny_ckpts)
    batch = make_batch(tiny_ckpts["qwen2"]["whisper"], [30.0, 5.0])
    with torch.no_grad():
        tokens, speech_mask = lsm.encode_speech(batch)
    assert tokens.shape == (2, 88, 64)
    assert speech_mask.sum(1).tolist() == [88, 15]  # 30 s: all; 5 s: ceil(80000 / 5440) = 15


def test_qformer_windows_are_independent():
    """Window k sees exactly frames [17k, 17k + 17); the last 1500 - 88 * 17 = 4 frames are dropped."""
    torch.manual_seed(0)
    qf = M.WindowQFormer(enc_dim=12, window=17, hidden=16, layers=2, heads=2, ffn=32).eval()
    x = torch.randn(2, 1500, 12)
    with torch.no_grad():
        base = qf(x)
        y = x.clone()
        y[1, 17 * 3 + 16] += 1.0  # last frame of window 3 of sample 1
        y[:, 1496:] += 1.0  # dropped frames
        moved = (qf(y) - base).abs().amax(-1)  # (2, 88)
    assert base.shape == (2, 88, 16)
    assert moved.nonzero().tolist() == [[1, 3]]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_of_every_stage(tiny_ckpts, batch5, family):
    lsm = shared(tiny_ckpts, family)
    assert lsm.template_name == {"qwen2": "qwen2", "llama": "vicuna"}[family]
    B = 2
    with torch.no_grad():
        whisper = lsm.whisper(batch5["mel"]).last_hidden_state
        assert whisper.shape == (B, 1500, 64)
        pad = torch.arange(batch5["wav"].shape[1])[None] >= batch5["wav_lens"][:, None]
        audio, audio_pad = lsm.beats(batch5["wav"], pad)
        # 5 s: 498 fbank frames -> 31 time patches x 8 = 248 tokens; the 3 s row has 18 real time patches
        assert audio.shape == (B, 248, 32) and (~audio_pad).sum(1).tolist() == [248, 18 * 8]
        audio = lsm.ln_beats(audio).masked_fill(audio_pad[..., None], 0.0)  # padded BEATs tokens -> 0
        fused = torch.cat([lsm.ln_whisper(whisper), nn.functional.pad(audio, (0, 0, 0, 1500 - 248))], -1)
        assert fused.shape == (B, 1500, 64 + 32) and (fused[:, 248:, 64:] == 0).all()
        q = lsm.qformer(fused)  # windows: (B * 88, 17, 96) -> one query each
        assert q.shape == (B, 88, 32)
        tokens, speech_mask = lsm.encode_speech(batch5)
        assert tokens.shape == (B, 88, 64) and speech_mask.sum(1).tolist() == [15, 9]
        torch.testing.assert_close(tokens, lsm.proj(q), rtol=0, atol=0)
        out = lsm.speech_forward(batch5, layers=range(lsm.n_layers + 1))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    n_target = sum(len(lsm._ids(t)) + 1 for t in batch5["targets"])  # + EOS
    assert out["n_tokens"].item() == n_target and 0 <= out["n_correct"].item() <= n_target
    assert sorted(out["hidden"]) == [0, 1, 2, 3]
    assert all(h.shape == (B, 88, 64) for h in out["hidden"].values())
    assert out["speech_mask"].shape == (B, 88) and out["speech_mask"].sum(1).tolist() == [15, 9]
    hidden, text_mask = lsm.text_forward(batch5["transcripts"], batch5["instructions"], [0, 2])
    m = max(len(lsm._ids(t)) for t in batch5["transcripts"])
    assert text_mask.sum(1).tolist() == [len(lsm._ids(t)) for t in batch5["transcripts"]]
    assert all(h.shape == (B, m, 64) for h in hidden.values())


def test_whisper_only(tiny_ckpts, batch5):
    lsm = build(tiny_ckpts, beats=False)
    assert lsm.beats is None and lsm.ln_beats is None
    assert lsm.qformer.bert.config.encoder_hidden_size == 64  # Whisper's width alone
    with torch.no_grad():
        out = lsm.speech_forward(batch5, layers=[0])
    assert out["hidden"][0].shape == (2, 88, 64) and torch.isfinite(out["loss"])


def test_template_choice_and_errors(tiny_ckpts):
    with pytest.raises(ValueError, match="BOS"):
        build(tiny_ckpts, "qwen2", template="vicuna")  # Qwen2 has no BOS token
    lsm = build(tiny_ckpts, "llama", beats=False, template="qwen2")  # text markers, tokenized as plain text
    assert lsm.template_name == "qwen2" and lsm.prefix_ids == lsm._ids("<|audio_bos|>")
    with pytest.raises(ValueError, match="speech-tokens"):
        build(tiny_ckpts, "qwen2", beats=False, speech_tokens="some")


# ----------------------------------------------------------------------------- prompt splicing


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_and_inputs_by_hand(tiny_ckpts, batch5, family):
    lsm = shared(tiny_ckpts, family)
    tok = lsm.tokenizer
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    if family == "llama":
        before, after = [tok.bos_token_id] + ids("USER: <Speech>"), ids(f"</Speech> {INSTR}\nASSISTANT:")
        assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    else:
        before, after = ids("<|audio_bos|>"), ids(f"<|audio_eos|>{INSTR}")
        assert tok.bos_token_id is None and tok.eos_token == "<|endoftext|>"
        assert before == [tok.convert_tokens_to_ids("<|audio_bos|>")]
    with torch.no_grad():
        tokens, _ = lsm.encode_speech(batch5)
        inp = lsm.splice(list(tokens), batch5["instructions"], batch5["targets"])
    emb = lsm.llm.get_input_embeddings().weight
    rows = []
    for i in range(2):
        target = ids(batch5["targets"][i]) + [tok.eos_token_id]
        rows.append((before, after, target))
    S = max(len(b) + 88 + len(a) + len(t) for b, a, t in rows)
    assert inp["embeds"].shape == (2, S, 64)
    for i, (b, a, t) in enumerate(rows):
        n = len(b) + 88 + len(a) + len(t)
        expected = [-100] * (len(b) + 88 + len(a)) + t + [-100] * (S - n)
        assert inp["labels"][i].tolist() == expected
        assert inp["mask"][i].tolist() == [1] * n + [0] * (S - n)
        assert inp["position_ids"][i, :n].tolist() == list(range(n))
        e = inp["embeds"][i]
        torch.testing.assert_close(e[:len(b)], emb[b], rtol=0, atol=0)
        torch.testing.assert_close(e[len(b):len(b) + 88], tokens[i], rtol=0, atol=0)
        torch.testing.assert_close(e[len(b) + 88:n], emb[a + t], rtol=0, atol=0)
        assert (e[n:] == 0).all()
        assert inp["pos"][i].tolist() == list(range(len(b), len(b) + 88))


def test_left_padding_for_generation(tiny_ckpts):
    lsm = shared(tiny_ckpts, "llama")
    texts = lsm._embed_texts(["a dog", "the quick brown fox jumps over the lazy dog"])
    inp = lsm.splice(texts, [INSTR, INSTR], left_pad=True)
    n = [len(lsm.prefix_ids) + len(t) + len(lsm._ids(f"</Speech> {INSTR}\nASSISTANT:")) for t in texts]
    S = max(n)
    for i in range(2):
        assert inp["mask"][i].tolist() == [0] * (S - n[i]) + [1] * n[i]
        assert inp["position_ids"][i].tolist() == [0] * (S - n[i]) + list(range(n[i]))
        k, start = len(texts[i]), S - n[i] + len(lsm.prefix_ids)
        assert inp["pos"][i, :k].tolist() == list(range(start, start + k))
        torch.testing.assert_close(inp["embeds"][i, inp["pos"][i, :k]], texts[i], rtol=0, atol=0)
        assert inp["embeds"][i, S - n[i]].equal(lsm.llm.get_input_embeddings().weight[lsm.tokenizer.bos_token_id])


# ----------------------------------------------------------------------------- hidden states


@pytest.mark.parametrize("family", FAMILIES)
def test_layer0_and_positions(tiny_ckpts, batch5, family):
    lsm = shared(tiny_ckpts, family)
    with torch.no_grad():
        tokens, _ = lsm.encode_speech(batch5)
        out = lsm.speech_forward(batch5, layers=[0])
        hidden, text_mask = lsm.text_forward(batch5["transcripts"], batch5["instructions"], [0])
    torch.testing.assert_close(out["hidden"][0], tokens, rtol=0, atol=0)  # layer 0 = projector output
    emb = lsm.llm.get_input_embeddings().weight
    for i, t in enumerate(batch5["transcripts"]):
        t_ids = lsm._ids(t)
        torch.testing.assert_close(hidden[0][i, :len(t_ids)], emb[t_ids], rtol=0, atol=0)
        assert text_mask[i].tolist() == [True] * len(t_ids) + [False] * (text_mask.shape[1] - len(t_ids))
        assert (hidden[0][i, len(t_ids):] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_forward_stops_early_and_equals_full_forward(tiny_ckpts, batch5, family):
    lsm = shared(tiny_ckpts, family)
    L = lsm.n_layers
    texts, instr = batch5["transcripts"], batch5["instructions"]
    with torch.no_grad():
        inp = lsm.splice(lsm._embed_texts(texts), instr)
        full = lsm._run_decoder(inp, hidden_states=True).hidden_states  # reference: every layer
    assert len(full) == L + 1
    calls = []
    hooks = [layer.register_forward_hook(lambda mod, a, o, k=k: calls.append(k))
             for k, layer in enumerate(lsm.decoder.layers, start=1)]
    hooks.append(lsm.decoder.norm.register_forward_hook(lambda *a: calls.append("norm")))
    try:
        for layers in [(1,), (0, 2), (2, 1), (L,), (0,)]:
            calls.clear()
            hidden, mask = lsm.text_forward(texts, instr, layers)
            assert calls == list(range(1, max(layers) + 1)) + (["norm"] if max(layers) == L else [])
            for l in layers:
                torch.testing.assert_close(hidden[l], M.at_positions(full[l], inp["pos"], inp["pos_mask"]),
                                           rtol=0, atol=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(lsm.decoder.layers) == L and not isinstance(lsm.decoder.norm, nn.Identity)  # restored
    # padding changes nothing: each transcript alone gives the same states (the batch is right-padded)
    batched, _ = lsm.text_forward(texts, instr, [1, L])
    for i, t in enumerate(texts):
        alone, _ = lsm.text_forward([t], [instr[i]], [1, L])
        n = len(lsm._ids(t))
        for l in (1, L):
            torch.testing.assert_close(alone[l][0, :n], batched[l][i, :n], rtol=1e-5, atol=1e-5)


def test_text_forward_first_does_not_cut_later_hidden_states(tiny_ckpts, batch5):
    """transformers 5 installs its hidden-state capture hooks on the layers present at the first call that asks for
    hidden states; a text forward that cut the layer list for that first call made every later full forward return
    too few states (IndexError). A fresh model whose first call is text_forward(layers=[1]) must give the speech
    forward of a fresh model that never ran a text forward, exactly (same weights, eval mode, same inputs), and the
    text forward must still run only layer 1 (counting hooks)."""
    a, b = build(tiny_ckpts), build(tiny_ckpts)
    L, every = a.n_layers, list(range(a.n_layers + 1))
    calls = []
    hooks = [layer.register_forward_hook(lambda mod, args, out, k=k: calls.append(k))
             for k, layer in enumerate(a.decoder.layers, start=1)]
    hooks.append(a.decoder.norm.register_forward_hook(lambda *args: calls.append("norm")))
    with torch.no_grad():
        text, _ = a.text_forward(batch5["transcripts"], batch5["instructions"], [1])
        assert calls == [1]  # layers 2..L and the final norm were not run
        calls.clear()
        got = a.speech_forward(batch5, every)
        assert calls == list(range(1, L + 1)) + ["norm"]
        ref = b.speech_forward(batch5, every)
    for h in hooks:
        h.remove()
    assert sorted(got["hidden"]) == every and len(got["hidden"]) == L + 1
    for l in every:
        torch.testing.assert_close(got["hidden"][l], ref["hidden"][l], rtol=0, atol=0)
    assert got["loss"].item() == ref["loss"].item()
    # and the text states of the first call are those of a full forward of the other model
    with torch.no_grad():
        inp = b.splice(b._embed_texts(batch5["transcripts"]), batch5["instructions"])
        full = b._run_decoder(inp, hidden_states=True).hidden_states
    assert len(full) == L + 1
    torch.testing.assert_close(text[1], M.at_positions(full[1], inp["pos"], inp["pos_mask"]), rtol=0, atol=0)


def test_batch_invariance_of_speech_side(tiny_ckpts):
    """A clip gives the same speech tokens and LLM states alone as in a padded batch (BEATs padding zeroed,
    right padding of the LLM input)."""
    lsm = shared(tiny_ckpts)
    both = make_batch(tiny_ckpts["qwen2"]["whisper"], [4.0, 2.0], seed=3)
    alone = {k: (v[1:] if torch.is_tensor(v) else v[1:]) for k, v in both.items()}
    alone["wav"] = alone["wav"][:, :alone["wav_lens"][0]]
    with torch.no_grad():
        a, b = lsm.speech_forward(both, layers=[0, 3]), lsm.speech_forward(alone, layers=[0, 3])
    for l in (0, 3):
        torch.testing.assert_close(a["hidden"][l][1], b["hidden"][l][0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- trainable set, gradients


def expected_trainable(lsm):
    """Count by hand from the sizes: LayerNorms, Q-Former (BERT layers with cross-attention), query, projector,
    LoRA A (r x in) and B (out x r) on q_proj (out = heads * head_dim) and v_proj (out = kv_heads * head_dim)."""
    dw, db = lsm.whisper.config.d_model, lsm.beats.cfg.encoder_embed_dim
    H, F, E, nq = 32, 64, dw + db, 2  # tiny Q-Former: hidden, FFN, encoder width, layers
    lin = lambda i, o: i * o + o  # noqa: E731
    qlayer = (3 * lin(H, H) + lin(H, H) + 2 * H  # self-attention q, k, v, output dense, LayerNorm
              + lin(H, H) + 2 * lin(E, H) + lin(H, H) + 2 * H  # cross-attention
              + lin(H, F) + lin(F, H) + 2 * H)  # query FFN
    qformer = 2 * H + nq * qlayer + H  # input LayerNorm, layers, the query
    c = lsm.causal_lm.config
    d, hd, r = c.hidden_size, c.hidden_size // c.num_attention_heads, 8
    lora = c.num_hidden_layers * (r * d + c.num_attention_heads * hd * r + r * d + c.num_key_value_heads * hd * r)
    return 2 * dw + 2 * db + qformer + lin(H, d) + lora


def test_trainable_parameters(tiny_ckpts, capsys):
    p = tiny_ckpts["qwen2"]
    lsm = M.LSM(p["whisper"], p["llm"], p["beats"], llm_dtype="float32", **TINY_QFORMER)
    printed = capsys.readouterr().out
    trainable = lsm.trainable_state()
    n = sum(t.numel() for t in trainable.values())
    assert n == expected_trainable(lsm) == 41632
    assert f"trainable parameters {n:,}" in printed
    for name in trainable:
        assert name.split(".")[0] in ("ln_whisper", "ln_beats", "qformer", "proj") or (
            name.startswith("llm.") and "lora_" in name), name
    assert all(not p.requires_grad for p in lsm.whisper.parameters())
    assert all(not p.requires_grad for p in lsm.beats.parameters())
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 3 * 2 * 2 and all(("q_proj" in n) or ("v_proj" in n) for n in lora)
    lsm.train()
    assert not lsm.whisper.training and not lsm.beats.training and lsm.qformer.training


def test_gradients_reach_trainable_and_never_frozen(tiny_ckpts, batch5):
    lsm = build(tiny_ckpts).train()
    perturb_trainable(lsm)  # LoRA B = 0 at init would leave LoRA A without gradient
    out = lsm.speech_forward(batch5, layers=[0, 1])
    assert out["hidden"][0].requires_grad and out["hidden"][1].requires_grad
    (out["loss"] + out["hidden"][1].pow(2).mean()).backward()
    for name, p in lsm.named_parameters():
        if p.requires_grad and (".attention.attention.query." in name or ".attention.attention.key." in name):
            # one query per window attends only to itself: softmax over one key is 1, so the Q-Former's
            # self-attention query/key weights get an exact zero gradient (as in SALMONN) -- but one is produced,
            # so DistributedDataParallel sees them used
            assert p.grad is not None and (p.grad == 0).all(), name
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_ddp_two_steps_without_unused_parameters(tiny_ckpts, batch5, tmp_path):
    import torch.distributed as dist
    lsm = build(tiny_ckpts).train()
    perturb_trainable(lsm)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(lsm)  # find_unused_parameters=False: every trainable is used
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            out = ddp(batch5, layers=[0])
            (out["loss"] + out["hidden"][0].pow(2).mean()).backward()
            opt.step()
        hidden, _ = ddp.module.text_forward(batch5["transcripts"], batch5["instructions"], [0])
        assert torch.isfinite(out["loss"]) and hidden[0].shape[0] == 2
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- --speech-tokens real


def test_speech_tokens_real(tiny_ckpts, batch5):
    lsm = shared(tiny_ckpts)
    lengths = []
    hook = lsm.decoder.register_forward_pre_hook(lambda mod, a, kw: lengths.append(kw["inputs_embeds"].shape[1]),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            tokens, _ = lsm.encode_speech(batch5)
            full = lsm.speech_forward(batch5, layers=[0])
            lsm.speech_tokens = "real"
            real = lsm.speech_forward(batch5, layers=[0])
    finally:
        lsm.speech_tokens = "all"
        hook.remove()
    assert full["loss"].shape == real["loss"].shape == () and torch.isfinite(real["loss"])
    assert full["n_tokens"] == real["n_tokens"]
    rest = [len(lsm.prefix_ids) + len(lsm._ids(lsm.after.replace("{instruction}", i))) + len(lsm._ids(t)) + 1
            for i, t in zip(batch5["instructions"], batch5["targets"])]
    assert lengths == [88 + max(rest), max(15 + rest[0], 9 + rest[1])]  # 5 s: 15 real windows, 3 s: 9
    assert real["hidden"][0].shape == (2, 15, 64) and real["speech_mask"].sum(1).tolist() == [15, 9]
    torch.testing.assert_close(real["hidden"][0][0], tokens[0, :15], rtol=0, atol=0)
    torch.testing.assert_close(real["hidden"][0][1, :9], tokens[1, :9], rtol=0, atol=0)
    assert (real["hidden"][0][1, 9:] == 0).all()  # padding of the shorter clip


# ----------------------------------------------------------------------------- save / load


def test_save_load_reproduces_logits(tiny_ckpts, batch5, tmp_path):
    a = build(tiny_ckpts, seed=0)
    perturb_trainable(a)
    path = str(tmp_path / "trainable.safetensors")
    a.save_trainable(path)
    b = build(tiny_ckpts, seed=123)  # another random init of the new modules, same base checkpoints
    assert not torch.equal(a.qformer.query, b.qformer.query)
    b.load_trainable(path)
    c = M.LSM.from_trainable(path, verbose=False).eval()  # rebuilt from the json sidecar
    assert c.build_args == a.build_args
    L = a.n_layers
    with torch.no_grad():
        outs = [m.speech_forward(batch5, layers=range(L + 1)) for m in (a, b, c)]
        logits = [m.causal_lm.get_output_embeddings()(o["hidden"][L]) for m, o in zip((a, b, c), outs)]
    for o, lg in zip(outs[1:], logits[1:]):
        assert torch.equal(lg, logits[0]) and torch.equal(o["loss"], outs[0]["loss"])
        for l in range(L + 1):
            assert torch.equal(o["hidden"][l], outs[0]["hidden"][l])
    wrong = build(tiny_ckpts, beats=False)
    with pytest.raises(ValueError, match="trainable.safetensors"):
        wrong.load_trainable(path)


def test_trainable_state_is_copied_whole_or_not_at_all():
    """load_trainable_state (LSM.load_trainable, train.py's --resume) names the file and every mismatch, and copies
    nothing unless every trainable parameter has its tensor of the same shape."""
    import data
    net = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    net[1].requires_grad_(False)  # frozen: neither saved nor expected
    good = {"0.weight": torch.ones(3, 2), "0.bias": torch.full((3,), 2.0)}
    before = net[0].weight.detach().clone()
    for state, message in ((dict(good, extra=torch.ones(1)), r"ck\.pt: .*missing \[\], unexpected \['extra'\] "
                                                             r"\(hint\)"),
                           ({"0.weight": good["0.weight"]}, r"missing \['0.bias'\]"),
                           (dict(good, **{"0.bias": torch.ones(4)}), r"0.bias has shape \(4,\), model has \(3,\)")):
        with pytest.raises(data.UserError, match=message):
            M.load_trainable_state(net, state, "ck.pt", "hint")
        assert torch.equal(net[0].weight, before)
    M.load_trainable_state(net, good, "ck.pt", "hint")
    assert torch.equal(net[0].weight, good["0.weight"]) and torch.equal(net[0].bias, good["0.bias"])


def test_config_fields_are_the_flags_and_the_saved_build_arguments(tiny_ckpts, tmp_path):
    """One list of hyperparameters: config.ModelConfig's fields are the model flags (with their defaults) and the
    keys of the .json beside the weights; a .json with a key that is not one of them is refused, naming the file."""
    import dataclasses
    import json

    import data
    names = [f.name for f in dataclasses.fields(config.ModelConfig)]
    args = config.add_model_args(argparse.ArgumentParser()).parse_args([])
    assert set(vars(args)) == set(names) | {"no_beats"}
    assert config.ModelConfig.from_args(args) == config.ModelConfig()
    assert config.ModelConfig.from_args(argparse.Namespace(**{**vars(args), "no_beats": True})).beats is None
    lsm = shared(tiny_ckpts)
    assert list(lsm.build_args) == names and lsm.build_args["lora_targets"] == ["q_proj", "v_proj"]
    path = str(tmp_path / "w.safetensors")
    lsm.save_trainable(path)
    with open(path + ".json") as f:
        saved = json.load(f)
    assert saved == lsm.build_args
    with open(path + ".json", "w") as f:
        json.dump(dict(saved, lora_rank=8), f)
    with pytest.raises(data.UserError, match=r"w.safetensors.json: \['lora_rank'\] are not build arguments"):
        M.LSM.from_trainable(path, verbose=False)
    with pytest.raises(ValueError, match="--speech-tokens must be one of"):
        config.ModelConfig(speech_tokens="some")


def test_bf16_forward_close_to_float32(tiny_ckpts, batch5, tmp_path):
    f32 = build(tiny_ckpts)
    perturb_trainable(f32)
    path = str(tmp_path / "t.safetensors")
    f32.save_trainable(path)
    bf16 = build(tiny_ckpts, llm_dtype="bfloat16").load_trainable(path)
    assert bf16.causal_lm.dtype == torch.bfloat16
    with torch.no_grad():
        o32, o16 = f32.speech_forward(batch5, layers=[0, 2]), bf16.speech_forward(batch5, layers=[0, 2])
    assert o16["hidden"][2].dtype == torch.bfloat16 and torch.isfinite(o16["loss"])
    assert abs(o16["loss"].item() - o32["loss"].item()) < 0.05 * o32["loss"].item()
    torch.testing.assert_close(o16["hidden"][0].float(), o32["hidden"][0], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_generate(tiny_ckpts, batch5, family):
    lsm = shared(tiny_ckpts, family)
    eos = lsm.tokenizer.eos_token_id
    for mode in ("st", "mt"):
        for beams in (1, 3):
            texts = lsm.generate(batch5, mode=mode, num_beams=beams, max_new_tokens=6)
            assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
            if mode == "st":
                continue  # the stopping checks below need no speech encoder: run them from text (cheaper)
            with lm_head_bias(lsm, eos, 1e4):  # EOS always wins: one token, then stop
                ids = lsm.generate_ids(batch5, mode=mode, num_beams=beams, max_new_tokens=6)
                assert ids.tolist() == [[eos], [eos]]
                assert lsm.tokenizer.batch_decode(ids, skip_special_tokens=True) == ["", ""]
            with lm_head_bias(lsm, eos, -1e4):  # EOS never: runs to max_new_tokens
                ids = lsm.generate_ids(batch5, mode=mode, num_beams=beams, max_new_tokens=6)
                assert ids.shape == (2, 6) and not (ids == eos).any()
    # left padding and position ids: greedy decoding of a batch equals decoding each sample alone
    batched = lsm.generate_ids(batch5, mode="mt", num_beams=1, max_new_tokens=5)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in batch5.items()}
        alone = lsm.generate_ids(one, mode="mt", num_beams=1, max_new_tokens=5)
        assert alone[0].tolist() == batched[i, :alone.shape[1]].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_stops_at_eos_mid_sequence(tiny_ckpts, batch5, family, beams):
    """EOS forced as token 2 of sample 0 and token 4 of sample 1: sample 0 stops there, sample 1 goes on."""
    lsm = shared(tiny_ckpts, family)
    eos, calls = lsm.tokenizer.eos_token_id, []
    eos_step = {0: 2, 1: 4}  # sample -> step (1-based) where EOS must win

    def force(mod, inputs, logits):
        calls.append(1)
        logits = logits.clone()
        for row in range(logits.shape[0]):
            if len(calls) == eos_step[row // beams]:
                logits[row, ..., eos] += 1e4
            else:
                logits[row, ..., eos] -= 1e4
        return logits
    hook = lsm.causal_lm.get_output_embeddings().register_forward_hook(force)
    try:
        ids = lsm.generate_ids(batch5, mode="mt", num_beams=beams, max_new_tokens=10)
        calls.clear()
        texts = lsm.generate(batch5, mode="mt", num_beams=beams, max_new_tokens=10)
    finally:
        hook.remove()
    assert ids.shape == (2, 4)  # generation ended when the last sample emitted EOS, not at max_new_tokens
    assert ids[0, 1] == eos and ids[1, 3] == eos and not (ids[1, :3] == eos).any()
    assert ids[0, 2:].tolist() == [lsm.pad_id] * 2  # finished rows are padded
    assert texts == [lsm.tokenizer.decode(ids[0, :1]).strip(), lsm.tokenizer.decode(ids[1, :3]).strip()]


# ----------------------------------------------------------------------------- flags


def test_flags_and_from_args(tiny_ckpts):
    parser = config.add_model_args(argparse.ArgumentParser())
    d = parser.parse_args([])
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.lora_targets) == (8, 32, 0.1, ["q_proj", "v_proj"])
    assert (d.template, d.speech_tokens, d.llm_dtype, d.second_per_window) == ("auto", "all", "bfloat16", 0.333333)
    assert (d.qformer_layers, d.qformer_hidden, d.qformer_heads, d.qformer_ffn) == (2, 768, 12, 3072)
    assert d.beats.endswith("BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt") and not d.no_beats
    p = tiny_ckpts["llama"]
    args = parser.parse_args(["--whisper", p["whisper"], "--llm", p["llm"], "--no-beats", "--llm-dtype", "float32",
                              "--qformer-hidden", "32", "--qformer-heads", "2", "--qformer-ffn", "64",
                              "--lora-r", "4", "--speech-tokens", "real"])
    lsm = M.LSM.from_args(args)
    assert lsm.beats is None and lsm.speech_tokens == "real" and lsm.template_name == "vicuna"
    assert lsm.llm.peft_config["default"].r == 4


def test_bad_inputs_are_named(tiny_ckpts):
    lsm = shared(tiny_ckpts)
    with pytest.raises(ValueError, match="sample 1 has no transcript"):
        lsm.text_forward(["hello", None], [INSTR, INSTR], [0])
    with pytest.raises(ValueError, match="out of range"):
        lsm.text_forward(["hello"], [INSTR], [lsm.n_layers + 1])
    with pytest.raises(ValueError, match="mode"):
        lsm.generate_ids({"transcripts": ["a"], "instructions": [INSTR]}, mode="asr")


def test_with_data_py_batches(tiny_ckpts, tmp_path):
    """A manifest read and collated by data.py goes through the model (ST with transcript, AAC without)."""
    import json

    import numpy as np
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    import data
    rng = np.random.default_rng(0)
    rows = [dict(id="a", audio="a.wav", task="st", text="hello world", translation="你好世界", tgt_lang="zh"),
            dict(id="b", audio="b.wav", task="aac", text="a dog barks")]
    for r, sec in zip(rows, (2.0, 1.5)):
        sf.write(tmp_path / r["audio"], (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    collate = data.Collator(WhisperFeatureExtractor.from_pretrained(tiny_ckpts["qwen2"]["whisper"]))
    batch = collate([data.SpeechDataset(data.read_manifest(tmp_path / "m.jsonl"))[i] for i in range(2)])
    lsm = shared(tiny_ckpts)
    with torch.no_grad():
        out = lsm.speech_forward(batch, layers=[0])
    assert out["speech_mask"].sum(1).tolist() == [6, 5]  # 32000 / 5440 -> 6 windows, 24000 / 5440 -> 5
    assert out["n_tokens"].item() == len(lsm._ids("你好世界")) + len(lsm._ids("a dog barks")) + 2
    hidden, mask = lsm.text_forward(batch["transcripts"][:1], batch["instructions"][:1], [0])
    assert mask.sum().item() == len(lsm._ids("hello world"))
