"""Tests for the real-width configs and writers of tiny.py, and for gpu_plan.py's arithmetic and JSON line."""
import copy
import json
import math

import pytest
import torch

import tiny
import runtime
import train


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- real widths (tiny.py)


@pytest.mark.parametrize("name, total", [("qwen2-7b", 7_615_616_512), ("vicuna-13b", 13_015_864_320)])
def test_real_llm_configs_count_to_the_published_totals(name, total):
    """Built on the meta device (no memory): the full-depth configs give the published parameter counts."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(tiny.real_llm_config(name))
    assert n_params(llm) == total
    cfg = llm.config
    if name == "qwen2-7b":  # grouped-query attention: 28 query heads share 4 key-value heads of 128
        assert llm.model.layers[0].self_attn.k_proj.weight.shape == (4 * 128, 3584)
        assert llm.lm_head.weight.shape == (152064, 3584) and not cfg.tie_word_embeddings
    else:
        assert llm.model.layers[0].self_attn.k_proj.weight.shape == (5120, 5120)
        assert llm.lm_head.weight.shape == (32000, 5120)


def test_real_whisper_and_beats_configs():
    import beats
    from transformers import WhisperModel
    with torch.device("meta"):
        whisper = WhisperModel(tiny.real_whisper_config())
        bts = beats.BEATs(tiny.real_beats_cfg())
    assert n_params(whisper.encoder) == 636_784_640  # as transformers counts Whisper-large-v2's encoder
    assert len(whisper.encoder.layers) == 32 and whisper.encoder.embed_positions.weight.shape == (1500, 1280)
    assert whisper.encoder.conv1.weight.shape == (1280, 80, 3)
    # BEATs cpt2 by hand: patch conv 16*16*512, LN 2*512, proj 512*768+768, pos conv 768*48*128 + 128 + 768,
    # relative bias 320*12, 12 layers of (4 (768^2 + 768) + grep 64*8+8 + 12 + 2 LN 2*768 + FFN 2*768*3072 + 3072
    # + 768), final LN 2*768, AudioSet head 768*527 + 527
    layer = 4 * (768 * 768 + 768) + 64 * 8 + 8 + 12 + 2 * 2 * 768 + 2 * 768 * 3072 + 3072 + 768
    expected = (16 * 16 * 512 + 2 * 512 + 512 * 768 + 768 + 768 * 48 * 128 + 128 + 768 + 320 * 12 + 12 * layer
                + 2 * 768 + 768 * 527 + 527)
    assert n_params(bts) == expected
    assert tiny.real_beats_cfg(2)["encoder_layers"] == 2 and tiny.real_whisper_config(3).encoder_layers == 3
    assert tiny.real_llm_config("vicuna-13b", 5).num_hidden_layers == 5
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            tiny.real_llm_config("qwen2-7b", bad)
    with pytest.raises(ValueError, match="real LLM must be one of"):
        tiny.real_llm_config("qwen2-72b")


@pytest.fixture
def small_real_configs(monkeypatch):
    """REAL_CONFIGS with small widths: write_real_checkpoints runs the same code in a second (the real widths
    cost ~25 s and 3 GB per folder; the real_width test exercises those)."""
    cfgs = copy.deepcopy(tiny.REAL_CONFIGS)
    cfgs["whisper-large-v2"]["config"].update(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, vocab_size=64,
                                              decoder_attention_heads=2, decoder_ffn_dim=64, max_target_positions=16,
                                              pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                              decoder_start_token_id=1)
    cfgs["beats-cpt2"]["config"].update(embed_dim=24, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                        encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4, predictor_class=5)
    for name in tiny.REAL_LLMS:
        cfgs[name]["config"].update(vocab_size=1000, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                    num_key_value_heads=2 if name == "qwen2-7b" else 4)
    monkeypatch.setattr(tiny, "REAL_CONFIGS", cfgs)
    return cfgs


@pytest.mark.parametrize("llm, dtype", [("qwen2-7b", torch.bfloat16), ("vicuna-13b", torch.float16)])
def test_write_real_checkpoints_formats_depths_and_reuse(tmp_path, small_real_configs, llm, dtype):
    import beats
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperModel
    paths = tiny.write_real_checkpoints(tmp_path, llm, layers={"whisper": 2, "llm": 3}, seed=1)
    assert paths == dict(whisper=str(tmp_path / "whisper-large-v2"), llm=str(tmp_path / llm),
                         beats=str(tmp_path / "beats-cpt2" / beats.BEATS_CKPT_NAME))
    whisper = WhisperModel.from_pretrained(paths["whisper"])
    assert whisper.config.encoder_layers == whisper.config.decoder_layers == 2
    assert whisper.config.num_mel_bins == 80 and whisper.config.max_source_positions == 1500
    bts = beats.load_beats(paths["beats"])  # the official {cfg, model, label_dict} format, loaded strictly
    assert bts.cfg.encoder_layers == 12 and bts.cfg.deep_norm and bts.cfg.input_patch_size == 16  # not overridden
    model = AutoModelForCausalLM.from_pretrained(paths["llm"], dtype="auto")
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    assert model.dtype == dtype  # the published checkpoint's dtype
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 1000 > len(tok)
    assert model.config.eos_token_id == tok.eos_token_id  # the ids of the tokenizer written beside it
    assert model.config.model_type == tiny.REAL_CONFIGS[llm]["family"]
    # same arguments: reused (nothing rewritten); other depths: that component is rewritten, the rest reused
    stamp = {k: (tmp_path / f"{k}.done").stat().st_mtime_ns for k in ("whisper-large-v2", llm)}
    tiny.write_real_checkpoints(tmp_path, llm, layers={"whisper": 2, "llm": 3}, seed=1)
    assert {k: (tmp_path / f"{k}.done").stat().st_mtime_ns for k in stamp} == stamp
    tiny.write_real_checkpoints(tmp_path, llm, layers={"whisper": 2, "llm": 1}, seed=1)
    assert (tmp_path / "whisper-large-v2.done").stat().st_mtime_ns == stamp["whisper-large-v2"]
    assert AutoModelForCausalLM.from_pretrained(paths["llm"]).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="keys"):
        tiny.write_real_checkpoints(tmp_path, llm, layers={"qformer": 1})
    with pytest.raises(ValueError, match="llm must be one of"):
        tiny.write_real_checkpoints(tmp_path, "qwen2")


def test_real_checkpoints_are_seeded(tmp_path, small_real_configs):
    from safetensors.torch import load_file
    a = tiny.write_real_checkpoints(tmp_path / "a", "qwen2-7b", layers=1, seed=3)
    b = tiny.write_real_checkpoints(tmp_path / "b", "qwen2-7b", layers=1, seed=3)
    c = tiny.write_real_checkpoints(tmp_path / "c", "qwen2-7b", layers=1, seed=4)
    sa, sb, sc = (load_file(f"{p['llm']}/model.safetensors") for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- gpu_plan.py on the tiny models


def plan_args(ckpts, *extra):
    import gpu_plan
    from conftest import TINY_QFORMER
    q = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_QFORMER.items()]
    return gpu_plan.parser().parse_args(["--whisper", ckpts["whisper"], "--beats", ckpts["beats"], "--llm", ckpts["llm"],
                                       *q, *extra])


def qformer_params(h, enc, ffn, layers):
    """Blip2QFormerModel with cross-attention in every layer, text FFN removed, + the learned query, by hand:
    query LayerNorm; per layer self-attention (q, k, v, out + LN), cross-attention (q, out from h; k, v from
    the encoder width; + LN), query FFN (h -> ffn -> h + LN)."""
    lin = lambda i, o: i * o + o
    layer = 4 * lin(h, h) + 2 * h + 2 * lin(h, h) + 2 * lin(enc, h) + 2 * h + lin(h, ffn) + lin(ffn, h) + 2 * h
    return 2 * h + layers * layer + h


def test_qformer_hand_count_matches_salmonn():
    assert qformer_params(768, 2048, 3072, 2) == 22_838_016  # SALMONN's Q-Former (DESIGN.md section 7)


@pytest.mark.parametrize("llm_dtype, llm_bytes", [("bfloat16", 2), ("float32", 4)])
def test_counts_and_bytes_against_hand_counts(tiny_ckpts, llm_dtype, llm_bytes):
    import gpu_plan
    from transformers import AutoConfig, AutoTokenizer
    ck = tiny_ckpts["qwen2"]
    args = plan_args(ck, "--llm-dtype", llm_dtype)
    parts = gpu_plan.count(gpu_plan.build(args, "meta"))
    V, d, f, L, kv = len(AutoTokenizer.from_pretrained(ck["llm"])), 64, 128, 3, 32  # tiny.TINY_LLM
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)
    layer = lin(d, d) + 2 * lin(d, kv) + lin(d, d, False) + 3 * lin(d, f, False) + 2 * d  # Qwen2: q, k, v biases
    assert parts["llm"]["params"] == 2 * V * d + L * layer + d and parts["llm"]["trainable"] == 0
    assert parts["lora"]["params"] == parts["lora"]["trainable"] == L * 8 * ((d + d) + (d + kv))  # r (in + out)
    w = AutoConfig.from_pretrained(ck["whisper"])  # tiny.TINY_WHISPER: d 64, FFN 128, 2 layers, 80 mels
    wl = lin(64, 64) + lin(64, 64, False) + 2 * lin(64, 64) + 2 * 64 + lin(64, 128) + lin(128, 64) + 2 * 64
    assert parts["whisper"]["params"] == 80 * 64 * 3 + 64 + 64 * 64 * 3 + 64 + 1500 * 64 + w.encoder_layers * wl + 2 * 64
    assert parts["qformer"]["params"] == qformer_params(32, 64 + 32, 64, 2)  # conftest.TINY_QFORMER, Whisper + BEATs
    assert parts["proj"]["params"] == lin(32, d) and parts["ln"]["params"] == 2 * 64 + 2 * 32
    for name, r in parts.items():
        per = llm_bytes if name == "llm" else 4  # encoders and everything trainable are float32
        assert r["frozen_bytes"] == (r["params"] - r["trainable"]) * per
        assert r["trainable_bytes"] == r["grad_bytes"] == 4 * r["trainable"]
        assert r["adam_bytes"] == 2 * 4 * r["trainable"]  # exp_avg + exp_avg_sq, fp32
    tot = gpu_plan.totals(parts)
    assert tot["trainable"] == sum(r["trainable"] for r in parts.values())
    assert tot["static_bytes"] == tot["frozen_bytes"] + 4 * tot["trainable"] * (1 + 1 + 2)
    assert tot["sync_bytes"] == 0  # one process: no all-reduce
    eight = gpu_plan.totals(parts, processes=8)  # tiny model: the whole gradient fits one 2^25-value bucket
    assert eight["sync_bytes"] == tot["grad_bytes"] and eight["static_bytes"] == tot["static_bytes"] + tot["grad_bytes"]
    big = dict(parts, llm=dict(parts["llm"], grad_bytes=10 * 4 * runtime.GRAD_BUCKET))  # a CTC-sized gradient
    assert gpu_plan.totals(big, processes=8)["sync_bytes"] == 4 * (1 << 25)  # capped at one bucket: 128 MiB


def test_ctc_head_and_llama_parts(tiny_ckpts):
    import gpu_plan
    from transformers import AutoTokenizer
    ck = tiny_ckpts["llama"]
    parts = gpu_plan.count(gpu_plan.build(plan_args(ck, "--align", "ctc", "--no-beats"), "meta"))
    V = len(AutoTokenizer.from_pretrained(ck["llm"]))
    assert parts["ctc_head"]["params"] == parts["ctc_head"]["trainable"] == 64 * (V + 1) + (V + 1)  # + blank
    assert "beats" not in parts and parts["qformer"]["params"] == qformer_params(32, 64, 64, 2)
    assert parts["lora"]["params"] == 3 * 8 * ((64 + 64) + (64 + 32))  # tiny Llama: 4 heads, 2 kv heads


def test_real_lsm_trainable_totals(tmp_path):
    """The paper's trainable counts (28.1M / 33.3M), counted by the model's own construction on the meta device."""
    import gpu_plan
    for name, total in (("qwen2-7b", 28_121_344), ("vicuna-13b", 33_332_992)):
        args = gpu_plan.parser().parse_args(["--real", name])
        args.__dict__.update(gpu_plan.real_config_folder(name, tmp_path / name))
        parts = gpu_plan.count(gpu_plan.build(args, "meta"))
        assert sum(r["trainable"] for r in parts.values()) == total
        assert parts["llm"]["params"] == {"qwen2-7b": 7_615_616_512, "vicuna-13b": 13_015_864_320}[name]
        assert parts["whisper"]["params"] == 636_784_640


def test_live_tensors_peak_is_exact():
    import gpu_plan
    with gpu_plan.LiveTensors() as live:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4000
        del a
        c = torch.ones(250, dtype=torch.bfloat16)  # 500
        v = b[10:20]  # a view: no new storage
    assert live.peak == 8000 and live.now == 4500
    w = torch.ones(300, 200)  # made before: its views and in-place updates are no new memory
    with gpu_plan.LiveTensors() as live:
        w.t().mul_(2)
        w.view(-1)[:10].add_(1)
        x = w.t() @ torch.ones(300, 5)  # 200 x 5 result (+ the 300 x 5 operand)
    assert live.peak == 4 * (300 * 5 + 200 * 5) and live.now == 4 * 200 * 5
    del b, c, v, x


def test_activation_fit_recovers_and_predicts():
    import gpu_plan
    w, u, v = 3e8, 2e8, 5e7
    pts = [dict(batch=B, llm_layers=L, activation_bytes=w + B * (u + v * L)) for B, L in ((1, 1), (1, 2), (2, 1), (1, 4))]
    fit = gpu_plan.fit_activations(pts)
    assert fit["w"] == pytest.approx(w, rel=1e-9) and fit["v"] == pytest.approx(v, rel=1e-9)
    assert fit["held_out"]["llm_layers"] == 4 and abs(fit["held_out"]["rel_error"]) < 1e-9
    assert gpu_plan.fit_linear([1, 2, 4], [5.0, 7.0, 11.0]) == pytest.approx((3.0, 2.0))
    assert gpu_plan.cards_that_fit(30 * gpu_plan.GiB) == [40, 80, 141] and gpu_plan.cards_that_fit(200 * gpu_plan.GiB) == []


def test_kv_cache_by_hand():
    import gpu_plan
    cfg = tiny.real_llm_config("qwen2-7b")  # 28 layers, 4 kv heads of 128
    assert gpu_plan.kv_cache_bytes(cfg, 2, batch=8, beams=4, tokens=300) == 2 * 28 * 4 * 128 * 2 * 32 * 300
    cfg = tiny.real_llm_config("vicuna-13b")  # no GQA: 40 kv heads
    assert gpu_plan.kv_cache_bytes(cfg, 2, 1, 1, 1) == 2 * 40 * 40 * 128 * 2


def test_json_line_schema(tiny_ckpts, capsys):
    """Counts only, then a measured run on the tiny model: the last stdout line is the JSON with every number."""
    import gpu_plan
    ck = tiny_ckpts["qwen2"]
    base = ["--whisper", ck["whisper"], "--beats", ck["beats"], "--llm", ck["llm"], "--qformer-hidden", "32",
            "--qformer-heads", "2", "--qformer-ffn", "64"]
    gpu_plan.main(base + ["--no-measure"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tuple(out) == gpu_plan.JSON_KEYS and out["measured"] == [] and out["fit"] is None
    assert out["totals"]["trainable"] == sum(r["trainable"] for r in out["parts"].values())
    gpu_plan.main(base + ["--align", "ot", "--layers", "0", "1", "--measure-layers", "1", "2", "3", "--audio-seconds", "2",
                        "--target-tokens", "5", "--max-new-tokens", "4", "--num-beams", "2", "--decode-batch-size", "2",
                        "--per-device-batch-size", "1", "--dtype", "float32"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tuple(out) == gpu_plan.JSON_KEYS
    assert [(m["batch"], m["llm_layers"]) for m in out["measured"]] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    for m in out["measured"]:
        assert m["peak_bytes"] > 0 and m["flops"] > 0 and m["step_s"] > 0 and math.isfinite(m["loss"])
        assert m["peak_bytes"] == max(m["peak_forward_bytes"], m["peak_backward_bytes"])
        assert m["activation_bytes"] == m["peak_backward_bytes"] - m["grad_bytes"] > 0
    one = [m for m in out["measured"] if m["batch"] == 1]
    assert one[0]["flops"] < one[1]["flops"] < one[2]["flops"]  # one more LLM layer each
    assert out["fit"]["activations"]["held_out"]["llm_layers"] == 3
    assert [d["new_tokens"] for d in out["decode"]] == [4, 4, 4]  # exactly --max-new-tokens
    # the generation holds at least the KV cache, which grows with the depth
    assert all(d["peak_generate_bytes"] >= d["kv_cache_bytes"] for d in out["decode"])
    assert out["decode"][0]["peak_generate_bytes"] < out["decode"][2]["peak_generate_bytes"]
    # K and V x layers x 2 kv heads of 16 x 2 bytes (bf16 LLM) x 2 clips x 2 beams x (prompt + 4 new tokens)
    assert all(d["kv_cache_bytes"] == 2 * d["llm_layers"] * 2 * 16 * 2 * 2 * 2 * (d["prompt_len"] + 4)
               for d in out["decode"])
    p = out["predicted"]
    assert set(p) == {"weights_bytes", "train_flops_per_sample", "by_batch"} and list(p["by_batch"]) == ["1", "2", "4", "8"]
    assert set(p["by_batch"]["4"]) == {"activation_bytes", "train_bytes", "train_fits_gb", "decode_bytes", "decode_fits_gb"}
    t = out["totals"]  # training = static + max(gradients + activations, forward peak) >= weights + AdamW + gradients
    assert p["by_batch"]["1"]["train_bytes"] >= t["frozen_bytes"] + t["trainable_bytes"] + t["adam_bytes"] + t["grad_bytes"]


def test_bad_flags_are_one_line_errors(capsys):
    import gpu_plan
    for argv, msg in ((["--steps", "0"], "argument --steps: expected an integer >= 1"),
                      (["--measure-layers", "-1"], "--measure-layers"),
                      (["--real", "qwen2-7b", "--llm", "x"], "--real replaces")):
        with pytest.raises(SystemExit):
            gpu_plan.main(argv)
        assert msg in capsys.readouterr().err
