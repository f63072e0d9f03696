"""evaluate.py: BLEU against the sacrebleu command line (zh, ja), decoding on tiny checkpoints (both templates,
greedy and beam, 1 vs 2 processes), zero-shot MT without audio, alignment degree, Figure 5, --audio, --hyps, --table.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import soundfile as sf
import torch

import data
import evaluate as E
import ot
from conftest import TINY_QFORMER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSCRIPTS = ["hello world", "the quick brown fox jumps", "one two three four", "she sells sea shells",
               "a man is speaking"]
TRANSLATIONS = ["你好世界", "敏捷的棕色狐狸跳跃", "一二三四", "她卖海贝壳", "一个男人在说话"]
SECONDS = [1.5, 2.0, 1.0, 2.5, 1.2]
FAST = ["--max-new-tokens", "6", "--batch-size", "2", "--num-workers", "0"]

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far too small for intra-op threads; on a few shared cores the threads' spin-waits made
    every op ~1000x slower (torch and scikit-learn's OpenMP alike). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except ImportError:
        limits = contextlib.nullcontext()
    with limits:
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """5 noise clips (different lengths) with transcripts and Chinese translations; CoVoST's 'zh-CN' code."""
    folder = tmp_path_factory.mktemp("covost_like")
    rng = np.random.default_rng(0)
    lines = []
    for i, (src, tgt, sec) in enumerate(zip(TRANSCRIPTS, TRANSLATIONS, SECONDS)):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
        lines.append(json.dumps(dict(id=f"u{i}", audio=f"u{i}.wav", task="st", text=src, translation=tgt,
                                     tgt_lang="zh-CN"), ensure_ascii=False))
    path = folder / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _perturb(lsm, scale=0.05, seed=1):
    """Move the trainable parameters off their init (LoRA B starts at zero), as a trained model would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lsm.trainable_state().values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def trained(tiny_ckpts, tmp_path_factory):
    """{family: (ckpt path, the model that was saved)}: tiny LSMs saved with save_trainable (float32 LLM)."""
    import model as M
    out = {}
    for family in ("qwen2", "llama"):
        p = tiny_ckpts[family]
        torch.manual_seed(0)
        lsm = M.LSM(p["whisper"], p["llm"], p["beats"], llm_dtype="float32", verbose=False, **TINY_QFORMER).eval()
        _perturb(lsm)
        path = str(tmp_path_factory.mktemp(f"ckpt_{family}") / "best.safetensors")
        lsm.save_trainable(path)
        out[family] = (path, lsm)
    return out


def speech_batch(lsm, manifest, indices):
    """The data.py batch of these manifest entries, as evaluate.py builds it."""
    from transformers import WhisperFeatureExtractor
    entries = data.read_manifest(manifest)
    ds = data.SpeechDataset(entries)
    return data.Collator(WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"]))([ds[i] for i in indices])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]

# ----------------------------------------------------------------------------- BLEU


ZH_REFS = ["所有这些活动在密尔沃基都不是独一无二的。", "那里的许多吉祥物似乎也相信它们就是人们所描绘的那些动物。",
           "今天天气很好。", "我们明天去北京。", "他没有来。"]
ZH_HYPS = ["密尔沃基的所有活动都不是独一无二的。", "那里的许多吉祥物也似乎认为它们是描绘的动物。",
           "今天天气不错。", "我们明天要去北京。", ""]
JA_REFS = ["今日はとても良い天気です。", "私は明日東京に行きます。", "この本はとても面白いです。", "駅はどこですか。"]
JA_HYPS = ["今日は良い天気です。", "明日私は東京へ行きます。", "この本は面白いです。", "駅はどこにありますか。"]


def _sacrebleu_cli(*args):
    """The `sacrebleu` command of this Python (its console script runs the same main() as `-m sacrebleu`)."""
    cmd = [sys.executable, "-m", "sacrebleu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("lang,refs,hyps,tok", [("zh-CN", ZH_REFS, ZH_HYPS, "zh"),
                                                ("ja", JA_REFS, JA_HYPS, "ja-mecab")])
def test_bleu_equals_sacrebleu_command_line(tmp_path, capsys, lang, refs, hyps, tok):
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    hyps_file = tmp_path / "hyps.jsonl"
    hyps_file.write_text("".join(json.dumps(dict(id=str(i), reference=r, hypothesis=h, tgt_lang=lang),
                                            ensure_ascii=False) + "\n" for i, (r, h) in enumerate(zip(refs, hyps))),
                         encoding="utf-8")
    E.main(["--hyps", str(hyps_file)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"bleu", "signature"} and f"tok:{tok}" in last["signature"]
    assert 10 < last["bleu"] < 90  # a real score, not a degenerate 0 or 100
    ref, hyp = str(tmp_path / "ref.txt"), str(tmp_path / "hyp.txt")
    assert _sacrebleu_cli(ref, "-i", hyp, "-tok", tok, "-b") == f"{last['bleu']:.1f}"
    assert float(_sacrebleu_cli(ref, "-i", hyp, "-tok", tok, "-b", "-w", "6")) == pytest.approx(last["bleu"], abs=1e-6)
    # the same file with the language only on the command line
    hyps_file.write_text("".join(json.dumps(dict(reference=r, hypothesis=h), ensure_ascii=False) + "\n"
                                 for r, h in zip(refs, hyps)), encoding="utf-8")
    E.main(["--hyps", str(hyps_file), "--tgt-lang", lang])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == last


def test_tokenizer_by_language():
    assert [E.bleu_tokenizer(x) for x in ("zh", "zh-CN", "ZH_cn", "ja", "de", "en")] == \
        ["zh", "zh", "zh", "ja-mecab", "13a", "13a"]
    assert E.bleu_tokenizer("zh", "char") == "char"


def test_japanese_without_mecab_says_what_to_install(tmp_path, monkeypatch):
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(dict(reference="駅はどこですか。", hypothesis="駅はどこ", tgt_lang="ja")) + "\n")
    monkeypatch.setitem(sys.modules, "MeCab", None)  # import MeCab -> ImportError
    with pytest.raises(E.EvalError, match=r'pip install "sacrebleu\[ja\]"'):
        E.main(["--hyps", str(f)])
    E.main(["--hyps", str(f), "--tokenize", "char"])  # an explicit tokenizer needs no MeCab


def test_bad_hypotheses_files_are_named(tmp_path):
    f = tmp_path / "h.jsonl"
    good = json.dumps(dict(reference="a b", hypothesis="a b", tgt_lang="de"))
    for body, message in [(good + "\n{oops\n", "h.jsonl: line 2: invalid JSON"),
                          (good + "\n" + json.dumps(dict(reference="a")) + "\n", "line 2: 'hypothesis' must be"),
                          (json.dumps(dict(reference="a", hypothesis="a")) + "\n", "line 1: no 'tgt_lang'"),
                          (good + "\n" + json.dumps(dict(reference="a", hypothesis="a", tgt_lang="ja")) + "\n",
                           "line 2: tgt_lang 'ja' differs from 'de' on line 1"),
                          ("\n", "no hypotheses")]:
        f.write_text(body)
        with pytest.raises(E.EvalError, match=message):
            E.read_hyps(str(f))

# ----------------------------------------------------------------------------- decoding


def test_shards_cover_the_manifest_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 8):
            parts = [E.shard(n, r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("family,beams", [("qwen2", 1), ("qwen2", 2), ("llama", 1), ("llama", 2)])
def test_decode_manifest(trained, manifest, tmp_path, family, beams):
    """Hypotheses equal the model's own generate() on the same batches; files and BLEU are consistent."""
    ckpt, lsm = trained[family]
    out = tmp_path / "eval"
    metrics = E.main(["--ckpt", ckpt, "--manifest", manifest, "--num-beams", str(beams), "--output-dir", str(out),
                      "--limit", "3", "--max-new-tokens", "6", "--batch-size", "2", "--num-workers", "0"])
    hyps = read_jsonl(out / "hyps.st.jsonl")
    assert [h["id"] for h in hyps] == ["u0", "u1", "u2"]
    assert [h["src"] for h in hyps] == TRANSCRIPTS[:3] and [h["reference"] for h in hyps] == TRANSLATIONS[:3]
    assert {h["tgt_lang"] for h in hyps} == {"zh"}
    expected = []
    for batch in ([0, 1], [2]):
        expected += lsm.generate(speech_batch(lsm, manifest, batch), mode="st", num_beams=beams, max_new_tokens=6)
    assert [h["hypothesis"] for h in hyps] == expected
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    bleu = sacrebleu.corpus_bleu(expected, [TRANSLATIONS[:3]], tokenize="zh")
    assert saved["bleu"]["st"]["zh"]["score"] == pytest.approx(bleu.score)
    assert "tok:zh" in saved["bleu"]["st"]["zh"]["signature"] and saved["bleu"]["st"]["zh"]["n"] == 3
    assert saved["args"]["num_beams"] == beams and metrics["n"] == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_hypotheses_as_one(trained, manifest, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): uneven shards (2 + 3 utterances), results gathered in manifest order."""
    ckpt, _ = trained["qwen2"]
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "2", "--mode", "st", "mt",
            "--alignment", "0", "1", "--num-pairs", "3"] + FAST
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "evaluate.py"), *args,
           "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = E.main(args + ["--output-dir", str(tmp_path / "one")])
    for mode in ("st", "mt"):
        a = (tmp_path / "one" / f"hyps.{mode}.jsonl").read_text(encoding="utf-8")
        b = (tmp_path / "two" / f"hyps.{mode}.jsonl").read_text(encoding="utf-8")
        assert a == b and len(a.splitlines()) == 5
    two = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for l in ("0", "1"):
        assert two["alignment"]["log_w"][l] == pytest.approx(one["alignment"]["log_w"][l], rel=1e-5)
    assert "| Model" in proc.stdout and proc.stdout.count("BLEU =") == 2  # rank 0 alone prints


def test_mt_feeds_the_transcript_and_reads_no_audio(trained, manifest, tmp_path, monkeypatch):
    import model as M
    ckpt, lsm = trained["llama"]
    # the same manifest with every audio file missing: MT must not need them
    entries = read_jsonl(manifest)
    no_audio = tmp_path / "mt.jsonl"
    no_audio.write_text("".join(json.dumps(dict(e, audio=f"missing/{e['id']}.wav"), ensure_ascii=False) + "\n"
                                for e in entries), encoding="utf-8")
    def never(*a, **k):
        raise AssertionError("the speech side was used in --mode mt")
    monkeypatch.setattr(M.LSM, "encode_speech", never)
    monkeypatch.setattr(data, "load_audio", never)
    embedded = []
    real_embed = M.LSM._embed_texts
    monkeypatch.setattr(M.LSM, "_embed_texts", lambda self, texts: embedded.extend(texts) or real_embed(self, texts))
    E.main(["--ckpt", ckpt, "--manifest", str(no_audio), "--mode", "mt", "--num-beams", "2",
            "--output-dir", str(tmp_path / "out")] + FAST)
    assert embedded == TRANSCRIPTS  # the transcripts, in order, are what went where the speech goes
    hyps = read_jsonl(tmp_path / "out" / "hyps.mt.jsonl")
    embedded.clear()
    instr = [data.instruction("st", "zh")] * 5  # the ST prompt
    expected = []
    for k in range(0, 5, 2):
        expected += lsm.generate(dict(transcripts=TRANSCRIPTS[k:k + 2], instructions=instr[k:k + 2]),
                                 mode="mt", num_beams=2, max_new_tokens=6)
    assert [h["hypothesis"] for h in hyps] == expected
    assert [h["reference"] for h in hyps] == TRANSLATIONS


def test_audio_files_one_translation_per_line(trained, manifest, capsys):
    ckpt, lsm = trained["qwen2"]
    folder = os.path.dirname(manifest)
    files = [os.path.join(folder, f"u{i}.wav") for i in (3, 0)]
    E.main(["--ckpt", ckpt, "--audio", *files, "--num-beams", "1", "--tgt-lang", "zh"] + FAST)
    out = capsys.readouterr().out
    batch = speech_batch(lsm, manifest, [3, 0])
    assert out == "".join(h + "\n" for h in lsm.generate(batch, mode="st", num_beams=1, max_new_tokens=6))


def test_manifest_errors_name_the_line(trained, manifest, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(manifest, encoding="utf-8").readline()
                   + json.dumps(dict(id="x", audio="u0.wav", task="asr", text="hi")) + "\n")
    with pytest.raises(E.EvalError, match=r"bad.jsonl: line 2: task 'asr'"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", str(bad)])
    with pytest.raises(E.EvalError, match=r"line 1: invalid JSON"):
        bad.write_text("{oops\n")
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", str(bad)])
    with pytest.raises(E.EvalError, match=r"--alignment 0 4: the LLM has layers 0 \(embeddings\) .. 3"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--alignment", "0", "4"])
    with pytest.raises(E.EvalError, match="nothing.safetensors.json"):
        E.main(["--ckpt", str(tmp_path / "nothing.safetensors"), "--manifest", manifest])
    for bad_args in (["--manifest", manifest],  # no --ckpt
                     ["--hyps", "h", "--manifest", manifest],  # two inputs
                     ["--ckpt", "c", "--audio", "a.wav", "--mode", "mt"],  # no transcript for MT
                     ["--ckpt", "c", "--manifest", "m", "--mode", "none"]):  # nothing to do
        with pytest.raises(SystemExit):  # argparse's usage error
            E.main(bad_args)

# ----------------------------------------------------------------------------- alignment degree, Figure 5


def planted(B=6, d=16, seed=0):
    """Text clouds t_i (m_i tokens) and speech clouds that are t_i's points, each repeated twice (as several
    windows per word) plus small noise; padding filled with garbage that the masks must hide."""
    g = torch.Generator().manual_seed(seed)
    m = [3, 5, 4, 6, 2, 5][:B]
    text = torch.full((B, max(m), d), 1e4)
    speech = torch.full((B, 2 * max(m) + 1, d), -1e4)
    tmask = torch.zeros(B, max(m), dtype=torch.bool)
    smask = torch.zeros(B, speech.shape[1], dtype=torch.bool)
    for i, mi in enumerate(m):
        t = 3.0 * torch.randn(mi, d, generator=g)
        text[i, :mi], tmask[i, :mi] = t, True
        speech[i, :2 * mi] = t.repeat_interleave(2, 0) + 0.1 * torch.randn(2 * mi, d, generator=g)
        smask[i, :2 * mi] = True
    return speech, smask, text, tmask


def test_alignment_degree_lower_for_true_pairs_on_a_planted_case():
    speech, smask, text, tmask = planted()
    matched = E.alignment_degree(speech, smask, text, tmask)
    mismatched = E.alignment_degree(speech, smask, text, tmask, shift=1)
    assert np.isfinite(matched) and np.isfinite(mismatched)
    assert matched < mismatched - 2.0  # W about 0.01 * d vs 2 * 9 * d: log-ratio ~ 7
    # the formula: mean over pairs of log ot.wasserstein, padding ignored
    w = ot.wasserstein(speech, text, smask, tmask)
    assert matched == pytest.approx(w.log().mean().item(), rel=1e-6)
    for i in range(3):
        n, m = int(smask[i].sum()), int(tmask[i].sum())
        alone = E.alignment_degree(speech[i:i + 1, :n], smask[i:i + 1, :n], text[i:i + 1, :m], tmask[i:i + 1, :m])
        assert alone == pytest.approx(w[i].log().item(), rel=1e-4, abs=1e-4)
    # identical clouds: W may be ~0, the log stays finite
    assert np.isfinite(E.alignment_degree(text, tmask, text.clone(), tmask))


def test_alignment_and_tsne_on_the_tiny_model(trained, manifest, tmp_path):
    import matplotlib.image
    ckpt, lsm = trained["qwen2"]
    png = tmp_path / "fig5.png"
    metrics = E.main(["--ckpt", ckpt, "--manifest", manifest, "--mode", "none", "--alignment", "0", "1",
                      "--tsne", str(png), "--num-pairs", "4", "--batch-size", "4", "--num-workers", "0",
                      "--output-dir", str(tmp_path / "out")])
    assert metrics["bleu"] == {} and not (tmp_path / "out" / "hyps.st.jsonl").exists()
    a = json.loads((tmp_path / "out" / "metrics.json").read_text())["alignment"]
    assert a["layers"] == [0, 1] and a["num_pairs"] == 4
    assert all(np.isfinite(v) for v in [*a["log_w"].values(), *a["mismatched"].values()])
    # recompute layer 0 and 1 from the model for the same seeded pairs (one batch of 4)
    import random
    pairs = random.Random(0).sample(range(5), 4)
    batch = speech_batch(lsm, manifest, pairs)
    with torch.no_grad():
        out = lsm.speech_forward(batch, [0, 1])
        text, tmask = lsm.text_forward(batch["transcripts"], batch["instructions"], [0, 1])
    for l in (0, 1):
        expected = E.alignment_degree(out["hidden"][l], out["speech_mask"], text[l], tmask)
        assert a["log_w"][str(l)] == pytest.approx(expected, rel=1e-5)
        shifted = E.alignment_degree(out["hidden"][l], out["speech_mask"], text[l], tmask, shift=1)
        assert a["mismatched"][str(l)] == pytest.approx(shifted, rel=1e-5)
    assert a["mean"] == pytest.approx((a["log_w"]["0"] + a["log_w"]["1"]) / 2)
    # Figure 5: a real PNG of the promised size
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (round(E.FIG_INCHES[1] * E.FIG_DPI), round(E.FIG_INCHES[0] * E.FIG_DPI))
    assert img[..., :3].std() > 0.01  # something is drawn
    assert metrics["tsne"]["num_pairs"] == 4


def test_tsne_separates_planted_modalities(tmp_path):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    speech, text = rng.normal(0, 1, (20, 8)) + 10, rng.normal(0, 1, (20, 8)) - 10
    xy = E.tsne_figure(speech, text, str(tmp_path / "f.png"))
    assert xy.shape == (40, 2)
    # the two clusters stay apart in 2-D: every speech point is closer to the speech centre than to the text one
    cs, ct = xy[:20].mean(0), xy[20:].mean(0)
    assert (np.linalg.norm(xy[:20] - cs, axis=1) < np.linalg.norm(xy[:20] - ct, axis=1)).all()


def test_tsne_without_scikit_learn_fails_before_loading_the_model(trained, manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded before the dependency check"))
    with pytest.raises(E.EvalError, match="pip install scikit-learn matplotlib"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--tsne", str(tmp_path / "f.png")])

# ----------------------------------------------------------------------------- summary table


def test_summary_table_in_the_form_of_the_papers_tables(tmp_path, capsys):
    base = dict(name="base (Qwen2-7B)", bleu={"st": {"zh": {"score": 45.31}}, "mt": {"zh": {"score": 51.2}}})
    ista = dict(name="w/ AI-STA", bleu={"st": {"zh": {"score": 46.04}, "ja": {"score": 31.4}}},
                alignment=dict(layers=[0, 1], log_w={"0": 1.23456, "1": 2.5}, mean=1.86728, mismatched_mean=3.0))
    table = E.summary_table([base, ista]).splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert cells[0] == ["Model", "ST zh", "MT zh", "ST ja", "log W L0", "log W L1", "log W mean", "mismatched"]
    assert cells[2] == ["base (Qwen2-7B)", "45.3", "51.2", "-", "-", "-", "-", "-"]
    assert cells[3] == ["w/ AI-STA", "46.0", "-", "31.4", "1.235", "2.500", "1.867", "3.000"]
    paths = []
    for i, m in enumerate((base, ista)):
        paths.append(str(tmp_path / f"m{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(m, f)
    E.main(["--table", *paths])
    assert capsys.readouterr().out.splitlines() == table


def test_help_shows_the_defaults():
    text = E.build_parser().format_help()
    for flag, default in [("--num-beams", "4"), ("--max-new-tokens", "200"), ("--num-pairs", "1000")]:
        i = text.index("\n  " + flag)
        assert f"(default: {default})" in " ".join(text[i:i + 400].split())

# ----------------------------------------------------------------------------- robustness (issue 11.1, 11.4, 13)


def _manifest_with_missing_clip(manifest, tmp_path, missing=2):
    """The test manifest with entry `missing`'s audio absent (a typo or a failed download)."""
    rows = read_jsonl(manifest)
    folder = os.path.dirname(manifest)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(dict(r, audio=os.path.join(folder, r["audio"]) if i != missing else "gone.wav"),
                                       ensure_ascii=False) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return str(path)


def _counting_generate(monkeypatch, fail_at=None):
    """Patch LSM.generate to count its calls (and raise at call `fail_at`, as a kill would)."""
    import model as M
    calls, real = [], M.LSM.generate

    def generate(self, batch, **kw):
        calls.append(list(batch["ids"]))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(self, batch, **kw)
    monkeypatch.setattr(M.LSM, "generate", generate)
    return calls


def test_killed_evaluation_resumes_where_it_stopped(trained, manifest, tmp_path, monkeypatch):
    """Issue 11.4: hypotheses are written as they are decoded; a run killed in its 2nd batch, run again, decodes
    only the missing batches and writes exactly the uninterrupted run's files. Other settings discard the partial
    results instead of mixing them in."""
    ckpt, _ = trained["qwen2"]
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "1"] + FAST
    E.main(args + ["--output-dir", str(tmp_path / "ref")])
    out = tmp_path / "out"
    calls = _counting_generate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        E.main(args + ["--output-dir", str(out)])
    partial = read_jsonl(out / "partial" / "hyps.st.rank0.jsonl")
    assert [r["id"] for r in partial] == ["u0", "u1"] and not (out / "metrics.json").exists()
    with open(out / "partial" / "hyps.st.rank0.jsonl", "a", encoding="utf-8") as f:
        f.write('{"index": 2, "id": "u2", "hypo')  # the kill also cut a line short
    calls = _counting_generate(monkeypatch)
    E.main(args + ["--output-dir", str(out)])
    assert calls == [["u2", "u3"], ["u4"]]  # only the missing batches
    for name in ("hyps.st.jsonl",):
        assert (out / name).read_text(encoding="utf-8") == (tmp_path / "ref" / name).read_text(encoding="utf-8")
    assert not (out / "partial").exists()
    # a killed run with other settings: its partial hypotheses are not reused
    calls = _counting_generate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        E.main(args + ["--output-dir", str(out)])
    calls = _counting_generate(monkeypatch)
    E.main(["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "2"] + FAST + ["--output-dir", str(out)])
    assert len(calls) == 3


def test_skip_bad_scores_the_rest_and_lists_the_skipped(trained, manifest, tmp_path, monkeypatch, capsys):
    """Issue 11.4: a missing clip at line 3 stopped the evaluation with nothing written. Now the error names the entry
    without losing the batches before it, and --skip-bad scores the rest, listing the skipped ids (said on stderr)."""
    ckpt, _ = trained["qwen2"]
    bad = _manifest_with_missing_clip(manifest, tmp_path)
    args = ["--ckpt", ckpt, "--manifest", bad, "--num-beams", "1", "--output-dir", str(tmp_path / "out")] + FAST
    with pytest.raises(data.AudioError, match=r"entry 'u2' \(.*m\.jsonl: line 3\): audio file not found"):
        E.main(args)
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "partial" / "hyps.st.rank0.jsonl")] == ["u0", "u1"]
    calls = _counting_generate(monkeypatch)
    res = E.main(args + ["--skip-bad"])
    assert calls == [["u3"], ["u4"]]  # u0, u1 kept from the failed run; u2 left out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["skipped"] == {"st": ["u2"]} and saved["bleu"]["st"]["zh"]["n"] == 4
    hyps = read_jsonl(tmp_path / "out" / "hyps.st.jsonl")
    assert [h["id"] for h in hyps] == ["u0", "u1", "u3", "u4"]
    refs = [[TRANSLATIONS[i] for i in (0, 1, 3, 4)]]
    bleu = sacrebleu.corpus_bleu([h["hypothesis"] for h in hyps], refs, tokenize="zh")
    assert saved["bleu"]["st"]["zh"]["score"] == pytest.approx(bleu.score) and res["n"] == 5
    captured = capsys.readouterr()
    assert "--skip-bad: 1 of 5 entries have unreadable audio and are NOT in the st BLEU below: ['u2']" in captured.err
    assert "ST zh (4 segments, 1 skipped)" in captured.out


def test_metrics_json_is_strict_json_with_a_nan(trained, manifest, tmp_path, monkeypatch):
    """Issue 11.1: a NaN alignment degree was written as a bare NaN, which is not JSON."""
    monkeypatch.setattr(E, "log_wasserstein", lambda *a, **k: torch.full((a[0].shape[0],), float("nan")))
    E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--mode", "none", "--alignment", "0",
            "--num-pairs", "2", "--output-dir", str(tmp_path)] + FAST)
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert saved["alignment"]["log_w"]["0"] is None
    assert E.finite_json({"a": [1.0, float("inf")], "b": float("nan")}) == {"a": [1.0, None], "b": None}


def test_table_of_a_malformed_file_is_named(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"bleu": {"st": ', encoding="utf-8")
    with pytest.raises(E.EvalError, match=r"--table .*metrics\.json: line 1: invalid JSON"):
        E.main(["--table", str(bad)])
    bad.write_text('[1, 2]', encoding="utf-8")
    with pytest.raises(E.EvalError, match="not a metrics.json of evaluate.py"):
        E.main(["--table", str(bad)])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--table", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("evaluate.py: error: --table")
    assert "Traceback" not in proc.stderr


SLOW_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import model
real = model.LSM.generate
def generate(self, *a, **k):
    if os.environ.get("RANK") == "1":
        time.sleep({seconds})
    return real(self, *a, **k)
model.LSM.generate = generate
import evaluate
evaluate.main(sys.argv[1:])
"""


def test_a_rank_slower_than_the_timeout_does_not_end_a_finished_evaluation(trained, manifest, tmp_path):
    """Issue 13: rank 1 decodes ~5 s longer than rank 0 while --dist-timeout is 3 s (0.05 min). No collective waits on
    the decoding (rank 0 merges the per-rank files), so the evaluation ends normally, with the one-process result;
    --alignment runs after both ranks have finished decoding."""
    ckpt, _ = trained["qwen2"]
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK.format(root=ROOT, seconds=2.5))
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "1", "--alignment", "0", "--num-pairs", "3",
            "--dist-timeout", "0.05"] + FAST
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *args, "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    E.main(args[:-2] + ["--output-dir", str(tmp_path / "one")])
    a = (tmp_path / "one" / "hyps.st.jsonl").read_text(encoding="utf-8")
    assert a == (tmp_path / "two" / "hyps.st.jsonl").read_text(encoding="utf-8") and len(a.splitlines()) == 5
    assert json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))["world_size"] == 2
