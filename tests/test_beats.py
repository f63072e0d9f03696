"""Tests for beats.py: Kaldi fbank against transformers' numpy implementation, token grid, padding, checkpoint
format and errors, and hand-checked invariants of each BEATs component. Tiny random models only (CPU, seconds)."""
import math

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

import beats
from beats import BEATS_CKPT_NAME, kaldi_fbank, load_beats, relative_position_bucket, tiny_beats, write_tiny_beats


def reference_fbank(wav):
    """transformers' Kaldi-compatible fbank (the path ASTFeatureExtractor takes without torchaudio), BEATs settings."""
    mel = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20, max_frequency=8000,
                          sampling_rate=16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    return spectrogram(wav, window_function(400, "povey", periodic=False), frame_length=400, hop_length=160,
                       fft_length=512, power=2.0, center=False, preemphasis=0.97, mel_filters=mel, log_mel="log",
                       mel_floor=1.192092955078125e-07, remove_dc_offset=True).T


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # Kaldi's lowest 128-bin filters hold no FFT bin
def test_fbank_matches_transformers_reference():
    rng = np.random.default_rng(0)
    t = np.arange(20817) / 16000
    wav = 0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t)  # noise + a tone
    wav[5000:9000] *= 1e-3  # a quiet stretch: low-energy bins near the log floor
    ours = kaldi_fbank(torch.tensor(wav * 2 ** 15, dtype=torch.float32))
    ref = reference_fbank(wav * 2 ** 15)
    assert ours.shape == ref.shape == (1 + (20817 - 400) // 160, 128) == (128, 128)
    assert np.abs(ours.numpy() - ref).max() < 1e-3
    # batched input gives the same frames as each row alone
    both = kaldi_fbank(torch.tensor(np.stack([wav, wav[::-1]]) * 2 ** 15, dtype=torch.float32))
    assert torch.equal(both[0], ours)


def test_normalised_fbank_is_beats_preprocessing():
    wav = 0.1 * torch.randn(2, 8000)
    expected = (kaldi_fbank(wav * 32768.0) - 15.41663) / (2 * 6.55582)
    assert torch.allclose(tiny_beats().preprocess(wav), expected)


@pytest.mark.parametrize("seconds,tokens", [(1, 48), (5, 248), (30, 1496)])
def test_token_count(seconds, tokens):
    # F = 1 + (T - 400) // 160 fbank frames -> F // 16 time patches (the patch conv drops the rest) x 8 bins patches:
    # 1 s: 98 -> 6 -> 48; 5 s: 498 -> 31 -> 248; 30 s: 2998 -> 187 -> 1496
    model = tiny_beats()
    with torch.no_grad():
        feats, pad = model(0.1 * torch.randn(1, 16000 * seconds))
    assert feats.shape == (1, tokens, 32) and pad.shape == (1, tokens) and not pad.any()
    assert torch.isfinite(feats).all()


def test_padded_batch_equals_each_row_alone():
    model = tiny_beats(seed=1)
    # -> 248, 143, 54 whole frames -> 15, 8, 3 time patches -> 120, 64, 24 tokens. Row 1's frame 143 is partly real
    # and reaches time patch 8: it must count as padding.
    lengths = [40000, 23200, 9000]
    rows = [0.2 * torch.randn(n) for n in lengths]
    wav = 0.5 * torch.randn(3, max(lengths))  # the padding holds loud noise: it must be ignored
    mask = torch.ones(3, max(lengths), dtype=torch.bool)
    for i, r in enumerate(rows):
        wav[i, :len(r)], mask[i, :len(r)] = r, False
    with torch.no_grad():
        feats, pad = model(wav, mask)
        alone = [model(r[None])[0][0] for r in rows]
    assert (~pad).sum(1).tolist() == [120, 64, 24]
    for i, a in enumerate(alone):
        assert a.shape[0] == (~pad[i]).sum() and not pad[i, :len(a)].any()
        assert (feats[i, :len(a)] - a).abs().max() < 1e-5
    # AudioSet head of the fine-tuned model: masked mean over real tokens, same as each row alone
    probs = model.classify(wav, mask)
    assert torch.allclose(probs, torch.cat([model.classify(r[None]) for r in rows]), atol=1e-6)
    assert probs.shape == (3, 5) and ((probs > 0) & (probs < 1)).all()


def test_official_mask_mode_reproduces_beats_downsampling():
    # BEATs/SALMONN crop the sample mask to a multiple of F and take .all() over F chunks of T // F samples, then do
    # the same from F frames to N tokens. T = 40000, F = 248: 40000 % 248 = 72, chunks of 161 samples. A row real up
    # to sample 30000: chunk 186 (29946..30106) is partly real, so frames >= 187 are padding; tokens: 248 % 120 = 8,
    # pairs of frames, token i is padding iff 2i >= 187, i.e. i >= 94. Real up to 9000: 161 * 55 = 8855 < 9000 ->
    # frames >= 56 -> tokens >= 28. The exact mode keeps only whole real patches: 186 -> 11 patches -> 88; 54 -> 24.
    model = tiny_beats(seed=2)
    wav = 0.2 * torch.randn(3, 40000)
    mask = torch.zeros(3, 40000, dtype=torch.bool)
    mask[1, 30000:], mask[2, 9000:] = True, True
    with torch.no_grad():
        f_off, pad_off = model(wav, mask, mask_mode="official")
        f_ex, pad_ex = model(wav, mask)
        alone = model(wav[1:2, :30000])[0][0]
    assert (~pad_off).sum(1).tolist() == [120, 94, 28] and (~pad_ex).sum(1).tolist() == [120, 88, 24]
    assert torch.equal(pad_off[:, :94].any(1), torch.tensor([False, False, True]))
    assert torch.equal(f_off[0], f_ex[0])  # an unpadded row is the same in both modes
    assert (f_ex[1, :88] - alone).abs().max() < 1e-5
    assert (f_off[1, :88] - alone).abs().max() > 1e-3  # official: the partly padded patch is attended to
    with pytest.raises(ValueError, match="mask_mode"):
        model(wav, mask, mask_mode="salmonn")


def test_input_errors():
    model = tiny_beats()
    with pytest.raises(ValueError, match="2800"):
        model(torch.zeros(1, 2799))
    mask = torch.zeros(2, 16000, dtype=torch.bool)
    mask[1, 2000:] = True  # row 1 has less than one whole patch of real audio
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model(torch.zeros(2, 16000), mask)


def test_round_trip_and_official_format(tmp_path):
    path = write_tiny_beats(tmp_path / "sub" / "tiny.pt", seed=5)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"cfg", "model", "label_dict"} and set(beats.DEFAULTS) <= set(ckpt["cfg"])
    assert ckpt["label_dict"] == {i: f"/m/tiny{i}" for i in range(5)}
    loaded, fresh = load_beats(path), tiny_beats(seed=5)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.label_dict == ckpt["label_dict"] and loaded.cfg.encoder_embed_dim == 32
    wav = 0.2 * torch.randn(2, 20000)
    with torch.no_grad():
        assert torch.equal(loaded(wav)[0], fresh(wav)[0])
    # relative position table: one tensor, defined in layer 0, listed under every layer as the official model
    sd = loaded.state_dict()
    assert sd["encoder.layers.1.self_attn.relative_attention_bias.weight"].data_ptr() == \
        sd["encoder.layers.0.self_attn.relative_attention_bias.weight"].data_ptr()


def test_state_dict_has_the_official_key_names():
    per_layer = ["self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                 "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "self_attn.relative_attention_bias.weight", "self_attn.grep_a",
                 "self_attn.grep_linear.weight", "self_attn.grep_linear.bias", "self_attn_layer_norm.weight",
                 "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                 "final_layer_norm.weight", "final_layer_norm.bias"]
    official = {"patch_embedding.weight", "layer_norm.weight", "layer_norm.bias", "post_extract_proj.weight",
                "post_extract_proj.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v",
                "encoder.pos_conv.0.bias", "encoder.layer_norm.weight", "encoder.layer_norm.bias", "predictor.weight",
                "predictor.bias"} | {f"encoder.layers.{i}.{k}" for i in range(2) for k in per_layer}
    sd = tiny_beats().state_dict()
    assert set(sd) == official
    assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)  # weight norm over dim 2: one norm per tap
    assert sd["encoder.pos_conv.0.weight_v"].shape == (32, 8, 16)
    assert sd["encoder.layers.0.self_attn.grep_a"].shape == (1, 2, 1, 1)
    assert sd["encoder.layers.0.self_attn.relative_attention_bias.weight"].shape == (320, 2)
    # cfg switches remove their keys as in the official model
    plain = tiny_beats(relative_position_embedding=False, gru_rel_pos=False, finetuned_model=False, embed_dim=32,
                       conv_bias=True).state_dict()
    assert not any("relative_attention_bias" in k or "grep" in k or "predictor" in k or "post_extract" in k
                   for k in plain)
    assert "patch_embedding.bias" in plain


def _save_modified(tmp_path, change):
    ckpt = torch.load(write_tiny_beats(tmp_path / "ok.pt"), weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def test_checkpoint_errors(tmp_path):
    missing = _save_modified(tmp_path, lambda c: c["model"].pop("encoder.layers.1.fc2.bias"))
    with pytest.raises(ValueError, match=r"1 missing keys \['encoder.layers.1.fc2.bias'\]"):
        load_beats(missing)
    extra = _save_modified(tmp_path, lambda c: c["model"].__setitem__("encoder.layers.0.self_attn.bias_k",
                                                                       torch.zeros(1, 1, 32)))
    with pytest.raises(ValueError, match=r"1 unexpected keys \['encoder.layers.0.self_attn.bias_k'\]"):
        load_beats(extra)
    shape = _save_modified(tmp_path, lambda c: c["model"].__setitem__("predictor.bias", torch.zeros(7)))
    with pytest.raises(ValueError, match="predictor.bias"):
        load_beats(shape)
    no_cfg = _save_modified(tmp_path, lambda c: c.pop("cfg"))
    with pytest.raises(ValueError, match=f"not a BEATs checkpoint.*'label_dict', 'model'.*{BEATS_CKPT_NAME}"):
        load_beats(no_cfg)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt: cannot be read"):
        load_beats(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match=f"nowhere/x.pt.*{BEATS_CKPT_NAME}.*SALMONN"):
        load_beats(tmp_path / "nowhere" / "x.pt")
    with pytest.raises(ValueError, match="unknown cfg keys"):
        write_tiny_beats(tmp_path / "t.pt", encoder_layer=3)


def test_relative_position_bucket_by_hand():
    # 8 buckets, max distance 16: 4 per direction, |rel| < 2 exact, else 2 + floor(2 ln(|rel|/2) / ln 8) capped at 3
    # (|rel| = 2..5 -> 2, 6.. -> 3); rel > 0 adds 4.
    rel = torch.arange(-7, 8)
    expected = [3, 3, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 7, 7]
    assert relative_position_bucket(rel, 8, 16).tolist() == expected
    # BEATs' 320 / 800: 160 per direction, exact below 80; 160 -> 80 + floor(80 ln 2 / ln 10) = 104
    rel = torch.tensor([0, -1, 1, -79, 79, -80, -160, 160, -799, 800, 10 ** 6])
    assert relative_position_bucket(rel, 320, 800).tolist() == [0, 1, 161, 79, 239, 80, 104, 264, 159, 319, 319]


def test_relative_bias_orientation():
    # bias[h, i, j] for query i, key j uses bucket(j - i): key one step ahead -> bucket 161, one behind -> bucket 1
    enc = tiny_beats(seed=3).encoder
    table = enc.layers[0].self_attn.relative_attention_bias.weight
    with torch.no_grad():
        bias = enc.relative_bias(5)
    assert bias.shape == (2, 5, 5)
    assert torch.equal(bias[:, 0, 1], table[161]) and torch.equal(bias[:, 1, 0], table[1])
    assert torch.equal(bias[:, 4, 0], table[4]) and torch.equal(bias[:, 2, 2], table[0])
    assert all(layer.self_attn.relative_attention_bias is enc.layers[0].self_attn.relative_attention_bias
               for layer in enc.layers)


def test_attention_against_torch_sdpa():
    # softmax(q.k / sqrt(d) + gate_h,i * bias_h,i,j) v per head, padded keys excluded; the gate is
    # ga (gb a_h - 1) + 2 with (ga, gb) = sigmoid of the sums of outputs 0-3 and 4-7 of grep_linear(q_h,i)
    model = tiny_beats(seed=3)
    attn = model.encoder.layers[1].self_attn
    x, B, N = torch.randn(2, 12, 32), 2, 12
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 9:] = True
    with torch.no_grad():
        bias = model.encoder.relative_bias(N)
        q, k, v = (p(x).view(B, N, 2, 16).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        ga, gb = torch.sigmoid(attn.grep_linear(q).view(B, 2, N, 2, 4).sum(-1)).unbind(-1)
        gate = ga * (gb * attn.grep_a.view(1, 2, 1) - 1) + 2  # (B,H,N)
        mask = (gate[..., None] * bias).masked_fill(pad[:, None, None, :], float("-inf"))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ref = attn.out_proj(ref.transpose(1, 2).reshape(B, N, 32))
        out = attn(x, pad, bias)
        assert (out - ref).abs().max() < 1e-5
        plain = tiny_beats(seed=3, relative_position_embedding=False, gru_rel_pos=False).encoder.layers[1].self_attn
        q, k, v = (p(x).view(B, N, 2, 16).transpose(1, 2) for p in (plain.q_proj, plain.k_proj, plain.v_proj))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
        assert (plain(x, pad) - plain.out_proj(ref.transpose(1, 2).reshape(B, N, 32))).abs().max() < 1e-5


def test_weight_norm_conv_matches_torch():
    torch.manual_seed(0)
    ours = beats.WeightNormConv1d(32, 16, 4)
    with torch.no_grad():
        ours.weight_g.mul_(torch.rand(1, 1, 16) + 0.5)
    conv = torch.nn.Conv1d(32, 32, 16, padding=8, groups=4)
    conv = torch.nn.utils.parametrizations.weight_norm(conv, dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(ours.weight_g)
        conv.parametrizations.weight.original1.copy_(ours.weight_v)
        conv.bias.copy_(ours.bias)
        x = torch.randn(2, 32, 50)
        assert torch.allclose(ours(x), conv(x), atol=1e-6)


def _token_ln_stats(y, ln):
    z = (y - ln.bias) / ln.weight  # undo the affine part: a LayerNorm output has per-token mean 0, variance 1
    return z.mean(-1).abs().max(), (z.var(-1, unbiased=False) - 1).abs().max()


def test_deep_norm_and_layer_norm_placement():
    wav = 0.2 * torch.randn(1, 20000)
    deep = tiny_beats(seed=4)
    flat = tiny_beats(seed=4, deep_norm=False)  # same weights, flag off
    assert deep.encoder.layers[0].alpha == pytest.approx(math.sqrt(2)) and flat.encoder.layers[0].alpha == 1.0
    with torch.no_grad():
        y_deep, y_flat = deep(wav)[0], flat(wav)[0]
        assert (y_deep - y_flat).abs().max() > 1e-2
        # post-LN layer by hand: x = LN1(a x + Attn(x)); x = LN2(a x + FFN(x)), a = (2 L)^(1/4) = sqrt 2 for L = 2
        layer, x = deep.encoder.layers[0], torch.randn(1, 24, 32)
        h = layer.self_attn_layer_norm(math.sqrt(2) * x + layer.self_attn(x))
        expected = layer.final_layer_norm(math.sqrt(2) * h + layer.fc2(torch.nn.functional.gelu(layer.fc1(h))))
        assert torch.allclose(layer(x), expected, atol=1e-5)
    # post-LN: the output is the last layer's final_layer_norm; pre-LN: the encoder's closing layer_norm
    assert max(_token_ln_stats(y_deep[0], deep.encoder.layers[-1].final_layer_norm)) < 1e-3
    pre = tiny_beats(seed=4, deep_norm=False, layer_norm_first=True)
    with torch.no_grad():
        y_pre = pre(wav)[0]
    assert max(_token_ln_stats(y_pre[0], pre.encoder.layer_norm)) < 1e-3
    assert (y_pre - y_flat).abs().max() > 1e-2
    with pytest.raises(ValueError, match="deep_norm and layer_norm_first"):
        tiny_beats(deep_norm=True, layer_norm_first=True)


def test_positional_conv_reach():
    # kernel 16, padding 8 each side, last output dropped: a single token m changes outputs m - 7 .. m + 8 only
    enc = tiny_beats(seed=6).encoder
    x = torch.zeros(1, 40, 32)
    with torch.no_grad():
        base = enc.positional(x)
        x[0, 20] = 1.0
        changed = (enc.positional(x) - base)[0].abs().amax(-1) > 0
    changed[20] = False  # the residual itself
    assert changed.nonzero().flatten().tolist() == list(range(13, 20)) + list(range(21, 29))


def test_encoder_layer_norm_before_post_ln_layers():
    # post-LN (cpt2): encoder.layer_norm normalises the layers' input; pre-LN: it is applied after the last layer
    seen = {}
    for name, model in [("post", tiny_beats(seed=7)), ("pre", tiny_beats(seed=7, deep_norm=False,
                                                                         layer_norm_first=True))]:
        hook = model.encoder.layers[0].register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[0]))
        with torch.no_grad():
            model(0.2 * torch.randn(1, 20000))
        hook.remove()
        seen[name] = max(_token_ln_stats(seen[name][0], model.encoder.layer_norm))
    assert seen["post"] < 1e-3 and seen["pre"] > 0.1


def test_bfloat16_model_stays_close_to_float32():
    # guards the CPU bf16 grouped-conv workaround in WeightNormConv1d (without it the tiny model's error is ~0.5)
    wav = 0.2 * torch.randn(2, 20000)
    with torch.no_grad():
        f32 = tiny_beats(seed=8)(wav)[0]
        bf16 = tiny_beats(seed=8).to(torch.bfloat16)(wav)[0]
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - f32).abs().mean() < 0.05


def test_refused_object_names_it_and_the_unsafe_flag(tmp_path, tiny_ckpts):
    """A checkpoint whose label_dict has numpy keys (as a label table read with pandas would) and one whose cfg is an
    argparse.Namespace: the safe loader refuses both; the error names the refused globals and --beats-unsafe-load,
    which loads the same model as the plain file (a trusted file)."""
    import argparse
    import numpy as np
    import model as M
    from conftest import TINY_QFORMER
    plain = write_tiny_beats(tmp_path / "plain.pt")  # seed 0, as _save_modified
    ref = load_beats(plain)
    wav = 0.2 * torch.randn(1, 20000, generator=torch.Generator().manual_seed(0))
    numpy_keys = _save_modified(tmp_path, lambda c: c.__setitem__("label_dict", {np.int64(k): v for k, v in
                                                                                 c["label_dict"].items()}))
    numpy_keys.rename(tmp_path / "numpy_keys.pt")
    namespace = _save_modified(tmp_path, lambda c: c.__setitem__("cfg", argparse.Namespace(**c["cfg"])))
    for path, refused in ((tmp_path / "numpy_keys.pt", "numpy._core.multiarray.scalar"),
                          (namespace, "argparse.Namespace")):
        with pytest.raises(ValueError) as err:
            load_beats(path)
        msg = str(err.value)
        assert str(path) in msg and refused in msg and "--beats-unsafe-load" in msg and "\n" not in msg, msg
        trusted = load_beats(path, unsafe_load=True)
        with torch.no_grad():
            assert torch.equal(trusted(wav)[0], ref(wav)[0])
        assert set(trusted.label_dict) == set(ref.label_dict)  # np.int64 keys hash and compare as the ints
    # the model flag goes through LSM and is recorded in its build arguments (the .json beside every checkpoint)
    p = tiny_ckpts["qwen2"]
    with pytest.raises(ValueError, match="--beats-unsafe-load"):
        M.LSM(p["whisper"], p["llm"], str(namespace), llm_dtype="float32", verbose=False, **TINY_QFORMER)
    lsm = M.LSM(p["whisper"], p["llm"], str(namespace), llm_dtype="float32", verbose=False, beats_unsafe_load=True,
                **TINY_QFORMER)
    assert lsm.build_args["beats_unsafe_load"] is True and lsm.beats.cfg.encoder_embed_dim == 32


def test_cfg_without_deep_norm_warns_and_loads_as_the_official_code(tmp_path):
    path = _save_modified(tmp_path, lambda c: c["cfg"].pop("deep_norm"))
    with pytest.warns(UserWarning, match="no 'deep_norm' key.*deep_norm=False"):
        model = load_beats(path)
    assert model.encoder.layers[0].alpha == 1.0  # the official BEATsConfig default: deep_norm False
    flat = tiny_beats(seed=0, deep_norm=False)  # the weights _save_modified wrote
    wav = 0.2 * torch.randn(1, 20000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(wav)[0], flat(wav)[0])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cfg with the key loads without any warning
        load_beats(write_tiny_beats(tmp_path / "ok.pt"))
