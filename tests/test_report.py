"""Tests for the real-width configs and writers of tiny.py, and for report.py's arithmetic and JSON line."""
import copy
import json

import pytest
import torch

import tiny


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
