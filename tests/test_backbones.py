"""Tests for demo/backbones.py on a tiny corpus (40 train / 8 dev utterances) with tiny budgets: every artefact
loads the way the stage scripts load the real checkpoints, the LSM builds from them and reads the LM in the format
it was trained on, the tokenizer round-trips the corpus' languages, training lowers the LM's loss, the mel and
encoder shortcuts equal the 30 s path, and a build is a pure function of the seed. About 30 s."""
import json
import os
import subprocess
import sys

import pytest
import torch

import beats as beats_lib
import data
from conftest import TINY_QFORMER, have_speech
from demo import backbones, corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CORPUS = ["--seed", "0", "--n-train", "40", "--n-dev", "8", "--n-test", "4", "--n-retrieval", "4", "--n-aac", "6",
                "--n-aac-dev", "2", "--workers", "1"]
# tiny budgets and sizes: seconds, not minutes
SMALL_BUILD = ["--jobs", "1", "--threads", "1", "--eval-utts", "8", "--vocab-size", "800",
               "--lm-hidden", "64", "--lm-layers", "2", "--lm-steps", "40", "--lm-batch", "16", "--lm-warmup", "5",
               "--whisper-dim", "32", "--whisper-layers", "1", "--ctc-steps", "8", "--ctc-batch", "4"]


pytestmark = pytest.mark.skipif(not have_speech(), reason="no eSpeak NG: pip install espeakng-loader")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    corpus.main(SMALL_CORPUS + ["--out", out])
    return out


@pytest.fixture(scope="module")
def built(small_corpus, tmp_path_factory):
    """(out dir, backbones.json summary) of one small build."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    out = str(tmp_path_factory.mktemp("backbones"))
    summary = backbones.main(SMALL_BUILD + ["--corpus", small_corpus, "--out", out, "--seed", "0"])
    return out, summary


# ----------------------------------------------------------------------------- artefacts load as the real ones


def test_artefacts_load_through_the_users_path(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor, WhisperModel
    out, summary = built
    assert sorted(os.listdir(out)) == ["backbones.json", "beats", "llm", "whisper"]
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"))
    assert lm.config.model_type == "qwen2" and lm.config.hidden_size == 64 and lm.config.num_hidden_layers == 2
    assert lm.config.vocab_size == len(tok) == summary["llm"]["vocab_size"]
    assert lm.generation_config.eos_token_id == tok.eos_token_id and lm.generation_config.do_sample is False
    assert os.path.isfile(os.path.join(out, "llm", "model.safetensors"))
    whisper = WhisperModel.from_pretrained(os.path.join(out, "whisper"))
    assert (whisper.config.num_mel_bins, whisper.config.max_source_positions, whisper.config.d_model) == (80, 1500, 32)
    assert WhisperFeatureExtractor.from_pretrained(os.path.join(out, "whisper")).feature_size == 80
    bts = beats_lib.load_beats(os.path.join(out, "beats", beats_lib.BEATS_CKPT_NAME))
    assert bts.cfg.encoder_embed_dim == summary["beats"]["encoder_embed_dim"]
    with open(os.path.join(out, "backbones.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["paths"]["llm"] == os.path.join(out, "llm")
    assert 0.0 <= on_disk["llm"]["mt_dev"]["bleu_zh"] <= 100.0 and 0.0 <= on_disk["llm"]["mt_dev"]["bleu_ja"] <= 100.0
    assert "tok:zh" in on_disk["llm"]["mt_dev"]["bleu_zh_signature"]
    assert on_disk["whisper"]["ctc_dev"]["wer"] >= 0.0 and len(on_disk["whisper"]["ctc_loss"]) >= 1


def test_lsm_builds_from_them_and_reads_the_lm_as_trained(built, small_corpus):
    """The LSM takes the three paths; a real corpus batch gives a finite loss; zero-shot MT through the LSM
    (transcript in place of the speech) decodes exactly what backbones.translate decoded: same prompt layout."""
    from transformers import WhisperFeatureExtractor
    import model as M
    out, _ = built
    torch.manual_seed(0)
    lsm = M.LSM(os.path.join(out, "whisper"), os.path.join(out, "llm"),
                os.path.join(out, "beats", beats_lib.BEATS_CKPT_NAME), llm_dtype="float32", verbose=False,
                **TINY_QFORMER).eval()
    assert lsm.template_name == "qwen2"
    entries = data.read_manifest(os.path.join(small_corpus, "st_zh_dev.jsonl"))[:3]
    ds = data.SpeechDataset(entries)
    batch = data.Collator(WhisperFeatureExtractor.from_pretrained(os.path.join(out, "whisper")))(
        [ds[i] for i in range(len(ds))])
    res = lsm.speech_forward(batch)
    assert torch.isfinite(res["loss"]) and res["n_tokens"] > 0
    via_lsm = lsm.generate(batch, mode="mt", num_beams=1, max_new_tokens=20)
    via_backbones = backbones.translate(lsm.causal_lm, lsm.tokenizer, [e["text"] for e in entries],
                                        batch["instructions"][0], max_new_tokens=20)
    assert via_lsm == via_backbones


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_knows_the_specials(built, small_corpus):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(built[0], "llm"))
    pairs = backbones.read_pairs(small_corpus, "train")
    texts = [p[k] for p in pairs[:10] for k in ("en", "zh", "ja")] + ["unseen: 한국어 ü ß 😀", "Translate the speech into Japanese."]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # Qwen2-7B's layout: no BOS, <|endoftext|> is EOS and pad; the prompt specials are single tokens
    assert tok.bos_token is None and tok.eos_token == tok.pad_token == "<|endoftext|>"
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>"]:
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    assert tok("hello", add_special_tokens=True).input_ids == tok("hello", add_special_tokens=False).input_ids
    # learned on the corpus: its English words are mostly single tokens
    en = [p["en"] for p in pairs]
    n_tokens = sum(len(tok(s, add_special_tokens=False).input_ids) for s in en)
    assert n_tokens < 1.5 * sum(len(s.split()) for s in en)


def test_template_ids_follow_the_lsm_template():
    tok = backbones.train_tokenizer(["the cat sees a dog", "那只猫看见一只狗。"] * 5 + backbones.prompt_texts(), 300)
    ids, n_prompt = backbones.template_ids(tok, "the cat", "Translate the speech into Chinese.", "猫。")
    assert tok.decode(ids) == "<|audio_bos|>the cat<|audio_eos|>Translate the speech into Chinese.猫。<|endoftext|>"
    assert tok.decode(ids[n_prompt:]) == "猫。<|endoftext|>"
    assert ids[0] == tok.convert_tokens_to_ids("<|audio_bos|>")


# ----------------------------------------------------------------------------- training


def test_lm_training_lowers_the_loss(built, small_corpus):
    """The saved LM has a lower dev loss than the same architecture at its seeded initialisation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, summary = built
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"))
    init = backbones.new_lm(tok, hidden=64, layers=2, seed=0)
    dev, _ = backbones.lm_examples(tok, backbones.read_pairs(small_corpus, "dev"), [])
    loss_trained, loss_init = backbones.lm_loss(trained, tok, dev), backbones.lm_loss(init, tok, dev)
    assert loss_init > 5.0  # about log(vocab) at init
    assert loss_trained < loss_init - 1.0
    assert loss_trained == pytest.approx(summary["llm"]["dev_loss_final"], abs=1e-3)
    assert loss_init == pytest.approx(summary["llm"]["dev_loss_init"], abs=1e-3)
    losses = [loss for _, loss in summary["llm"]["train_loss"]]
    assert losses[-1] < losses[0]


def test_ctc_pretraining_lowers_the_ctc_loss(built):
    losses = [loss for _, loss in built[1]["whisper"]["ctc_loss"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- mel and encoder shortcuts


def test_short_mels_rebuild_the_30s_input_and_encoder(built, small_corpus):
    """load_mels + pad_mels(3000) equals the Collator's mel, and encode() on it equals WhisperEncoder.forward."""
    from transformers import WhisperFeatureExtractor, WhisperModel
    out, _ = built
    fe = WhisperFeatureExtractor.from_pretrained(os.path.join(out, "whisper"))
    entries = data.read_manifest(os.path.join(small_corpus, "asr_dev.jsonl"))[:4]
    mels = backbones.load_mels(entries, fe)
    ds = data.SpeechDataset(entries)
    ref = data.Collator(fe)([ds[i] for i in range(len(ds))])["mel"]
    assert torch.allclose(backbones.pad_mels(mels, 3000), ref, atol=1e-5)
    assert torch.allclose(backbones.pad_mels(mels)[:, :, :mels[0].shape[1]][0], ref[0, :, :mels[0].shape[1]])
    enc = WhisperModel.from_pretrained(os.path.join(out, "whisper")).encoder.eval()
    with torch.no_grad():
        assert torch.allclose(backbones.encode(enc, ref), enc(ref).last_hidden_state, atol=1e-5)


def test_short_whisper_keeps_the_weights_and_the_real_frames(built, small_corpus, tmp_path):
    """short_whisper (demo.sh's Whisper input): the backbone's weights with the position embeddings cut to the
    longest clip of the corpus (+ one Q-Former window, whole seconds), the extractor padding to that length, the
    log-mels of the real frames unchanged; written whole or not at all; an already short one is linked."""
    import math
    import numpy as np
    import soundfile as sf
    from transformers import WhisperFeatureExtractor, WhisperModel
    out, _ = built
    src, dst = os.path.join(out, "whisper"), str(tmp_path / "short")
    info = backbones.short_whisper(src, dst, small_corpus)
    longest = max(sf.info(e["audio"]).duration for name in os.listdir(small_corpus)
                  if name.endswith(".jsonl") and name != "meta.jsonl"
                  for e in data.read_manifest(os.path.join(small_corpus, name)))
    assert info["seconds"] == math.ceil(longest + 17 / 50) < 30 and info["positions"] == 50 * info["seconds"]
    assert os.listdir(tmp_path) == ["short"] and not info["link"]  # no temporary folder left behind
    short, full = WhisperModel.from_pretrained(dst).state_dict(), WhisperModel.from_pretrained(src).state_dict()
    assert short.keys() == full.keys()
    for name, w in short.items():
        ref = full[name][:info["positions"]] if name == "encoder.embed_positions.weight" else full[name]
        assert torch.equal(w, ref), name
    fe_short, fe_full = WhisperFeatureExtractor.from_pretrained(dst), WhisperFeatureExtractor.from_pretrained(src)
    wav = data.load_audio(data.read_manifest(os.path.join(small_corpus, "st_zh_dev.jsonl"))[0]["audio"])[0]
    a = fe_short(wav, sampling_rate=16000, return_tensors="np").input_features[0]
    b = fe_full(wav, sampling_rate=16000, return_tensors="np").input_features[0]
    assert a.shape == (80, 100 * info["seconds"]) and b.shape == (80, 3000)
    real = len(wav) // 160 + 1  # the frames whose window sees the clip
    np.testing.assert_allclose(a[:, :real], b[:, :real], atol=1e-6)  # same samples, same STFT, same normalisation
    # short enough already: linked, not copied; an existing output is never overwritten
    again = backbones.short_whisper(dst, str(tmp_path / "link"), small_corpus)
    assert again["link"] and os.path.realpath(tmp_path / "link") == os.path.realpath(dst)
    with pytest.raises(FileExistsError):
        backbones.short_whisper(src, dst, small_corpus)


def test_stage2_layers_for_demo_sh(tmp_path, capsys):
    f = tmp_path / "layers.json"
    f.write_text(json.dumps(dict(mrr={"0": 0.3, "1": 0.2, "2": 0.01, "10": 0.02}, selected=[0, 1])))
    assert backbones.main(["--layers", str(f), "selected"]) == [0, 1]
    assert backbones.main(["--layers", str(f), "all"]) == [0, 1, 2, 10]  # numeric order
    assert capsys.readouterr().out == "0 1\n0 1 2 10\n"
    f.write_text(json.dumps(dict(mrr={"0": 0.01}, selected=[])))
    assert backbones.stage2_layers(str(f)) == [0]  # none above the threshold: the embedding layer
    with pytest.raises(SystemExit, match="backbones.py: error: .*nothing.json"):
        backbones.main(["--layers", str(tmp_path / "nothing.json"), "selected"])


def test_units_and_error_rates():
    units = backbones.Units(["the cat", "a dog"], "word")
    assert units.units == ["a", "cat", "dog", "the"] and len(units) == 5 and units.ids("the dog") == [4, 3]
    logits = torch.full((6, 5), -1.0)
    for t, k in enumerate([0, 4, 4, 0, 4, 3]):  # blank the the blank the dog -> "the the dog"
        logits[t, k] = 1.0
    assert units.greedy(logits, 6) == "the the dog" and units.greedy(logits, 3) == "the"
    chars = backbones.Units(["ab"], "char")
    assert chars.units == ["a", "b"] and chars.greedy(torch.eye(3)[[1, 1, 0, 1, 2]], 5) == "aab"
    assert backbones.wer(["a x c"], ["a b c"]) == pytest.approx(100 / 3)
    assert backbones.wer(["a b"], ["a b c"]) == pytest.approx(100 / 3)
    assert backbones.cer(["abd"], ["abc"]) == pytest.approx(100 / 3)


# ----------------------------------------------------------------------------- determinism and CLI


def test_same_seed_same_files_in_one_or_two_processes(built, small_corpus, tmp_path):
    """A second build with the same seed (now with the LM and Whisper in two processes) writes byte-identical
    weights and tokenizer; another seed changes them."""
    out, summary = built
    again = str(tmp_path / "again")
    other = backbones.main(SMALL_BUILD + ["--corpus", small_corpus, "--out", again, "--seed", "0", "--jobs", "2"])
    for rel in ["llm/model.safetensors", "llm/tokenizer.json", "llm/config.json", "whisper/model.safetensors",
                f"beats/{beats_lib.BEATS_CKPT_NAME}"]:
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert other["llm"]["train_loss"] == summary["llm"]["train_loss"]
    assert other["whisper"]["ctc_loss"] == summary["whisper"]["ctc_loss"]
    assert other["llm"]["mt_dev"] == summary["llm"]["mt_dev"]


def test_other_seed_other_weights(built, small_corpus, tmp_path):
    from safetensors.torch import load_file
    out, _ = built
    args = SMALL_BUILD + ["--corpus", small_corpus, "--out", str(tmp_path), "--seed", "1", "--lm-steps", "2",
                          "--ctc-steps", "2", "--eval-utts", "1"]
    backbones.main(args)
    a = load_file(os.path.join(out, "llm", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "llm", "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_cli_help_and_bad_corpus(tmp_path):
    helptext = backbones.get_parser().format_help()
    for flag in ["--corpus", "--out", "--seed", "--lm-steps", "--lm-hidden", "--ctc-steps", "--jobs"]:
        assert flag in helptext
    # run as a script from elsewhere (it finds the repository's modules itself); a missing corpus names the file
    res = subprocess.run([sys.executable, os.path.join(REPO, "demo", "backbones.py"), "--corpus",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode != 0 and "asr_train.jsonl" in res.stderr and "demo/corpus.py" in res.stderr
    assert not os.path.exists(tmp_path / "out")
