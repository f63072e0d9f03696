"""Tests for demo/corpus.py: grammar (hand-checked translations), splits, manifests in the
manifest format (README, "Manifests"), audio files, determinism across worker counts, resume, and captions that
match their sounds. Builds two tiny corpora (60/10/10 utterances, 20+5 sounds): ~10 s."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import have_speech
from demo import corpus
from demo.corpus import NP, Sentence, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seed", "0", "--n-train", "60", "--n-dev", "10", "--n-test", "10", "--n-retrieval", "12", "--n-aac", "20",
         "--n-aac-dev", "5"]
CONTRACT_KEYS = {"asr": {"id", "audio", "task", "text"}, "aac": {"id", "audio", "task", "text"},
                 "st": {"id", "audio", "task", "text", "translation", "tgt_lang"}}
ZH_MEASURE_WORDS = {row[3] for row in corpus.NOUNS.values()}
JA_COUNTERS = {row[5] for row in corpus.NOUNS.values()}


needs_speech = pytest.mark.skipif(not have_speech(), reason="no eSpeak NG: pip install espeakng-loader")


# ----------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("sentence, en, zh, ja", [
    (Sentence("transitive", NP("the", "cat", "red"), verb="see", obj=NP(2, "dog", "small")),
     "the red cat sees two small dogs", "那只红色的猫看见两只小狗。", "その赤い猫は二匹の小さい犬を見ます。"),
    (Sentence("transitive", "she", verb="like", obj=NP("the", "house", "big")),
     "she likes the big house", "她喜欢那座大房子。", "彼女はその大きい家が好きです。"),
    (Sentence("transitive", NP("my", "father"), verb="buy", obj=NP(3, "book", "old")),
     "my father buys three old books", "我的父亲买三本旧书。", "私の父は三冊の古い本を買います。"),
    (Sentence("transitive", "I", verb="eat", obj=NP("a", "apple")),
     "I eat an apple", "我吃一个苹果。", "私はりんごを食べます。"),
    (Sentence("transitive", "we", verb="read", obj=NP("a", "letter", "old"), time="morning"),
     "we read an old letter every morning", "我们每天早上读一封旧信。", "私たちは毎朝古い手紙を読みます。"),
    (Sentence("transitive", "they", verb="like", obj=NP("pl", "fish")),
     "they like fish", "他们喜欢鱼。", "彼らは魚が好きです。"),
    (Sentence("transitive", NP("your", "teacher"), verb="wash", obj=NP(5, "car")),
     "your teacher washes five cars", "你的老师洗五辆车。", "あなたの先生は五台の車を洗います。"),
    (Sentence("intransitive", "he", verb="run", place="park", time="day"),
     "he runs in the park every day", "他每天在公园跑步。", "彼は毎日公園で走ります。"),
    (Sentence("intransitive", NP("the", "child"), verb="study", place="library"),
     "the child studies in the library", "那个孩子在图书馆学习。", "その子供は図書館で勉強します。"),
    (Sentence("copula", NP("the", "car", "old"), pred="red"),
     "the old car is red", "那辆旧车是红色的。", "その古い車は赤いです。"),
    (Sentence("copula", NP("my", "flower"), pred="beautiful"),
     "my flower is beautiful", "我的花很漂亮。", "私の花はきれいです。"),
])
def test_hand_checked_translations(sentence, en, zh, ja):
    assert render(sentence) == (en, zh, ja)


def test_japanese_particles_in_order_and_verb_last():
    _, _, ja = render(Sentence("transitive", NP("my", "friend"), verb="draw", obj=NP(4, "bird", "white"),
                               time="evening"))
    assert ja == "私の友達は毎晩四羽の白い鳥を描きます。"
    # topic は, then the object with を, then the polite verb at the very end (SOV)
    assert ja.index("友達") < ja.index("は") < ja.index("鳥") < ja.index("を") < ja.index("描きます")
    assert ja.endswith("ます。")


def test_chinese_measure_words_and_no_plural():
    assert render(Sentence("transitive", "he", verb="buy", obj=NP(2, "umbrella")))[1] == "他买两把伞。"
    assert render(Sentence("transitive", "he", verb="see", obj=NP(7, "horse")))[1] == "他看见七匹马。"
    assert render(Sentence("transitive", "he", verb="see", obj=NP(3, "tree")))[1] == "他看见三棵树。"
    assert render(Sentence("transitive", "he", verb="see", obj=NP(6, "fish")))[1] == "他看见六条鱼。"
    # English marks the plural, Chinese does not
    en, zh, _ = render(Sentence("transitive", "she", verb="eat", obj=NP(3, "cake")))
    assert (en, zh) == ("she eats three cakes", "她吃三块蛋糕。")


def test_generated_sentences_follow_the_rules():
    splits = corpus.make_splits(600, 100, 100, seed=3)
    triples = [t for s in splits.values() for t in s]
    for en, zh, ja in triples:
        where = f"sentence {en!r} / {zh} / {ja}"
        assert not re.search(r"[0-9]", en + zh + ja), where  # numbers are words / characters
        assert en == en.strip() and "  " not in en and en.replace("I", "i").islower(), where
        assert zh.endswith("。") and ja.endswith("。"), where
        assert ja.endswith(("ます。", "です。")), where
        assert ja.count("は") == 1, where  # one topic, nothing else uses the kana は
        if "を" in ja or "が" in ja:
            assert ja.index("は") < ja.index("を" if "を" in ja else "が"), where
        assert "二" not in zh, where  # two before a measure word is 两
        assert "们" not in zh.replace("我们", "").replace("他们", ""), where  # no plural marking
        for m in re.finditer(r"[一两三四五六七八九]", zh):
            assert zh[m.end()] in ZH_MEASURE_WORDS, where  # a number is always followed by its measure word
        for m in re.finditer(r"[二三四五六七八九]", ja):
            assert ja[m.end()] in JA_COUNTERS and ja[m.end() + 1] == "の", where
        words = en.split()
        for i, w in enumerate(words[:-1]):
            if w in ("a", "an"):
                assert (w == "an") == (words[i + 1][0] in "aeiou"), where
    patterns = {("is" in en.split()) for en, _, _ in triples}
    assert patterns == {True, False}


def test_splits_are_disjoint_sized_and_deterministic():
    a = corpus.make_splits(300, 40, 50, seed=0, n_retrieval=30)
    assert a == corpus.make_splits(300, 40, 50, seed=0, n_retrieval=30)
    assert a != corpus.make_splits(300, 40, 50, seed=1, n_retrieval=30)
    sizes = {"train": 300, "dev": 40, "test": 50, "retrieval": 30}
    assert {s: len(a[s]) for s in a} == sizes
    for lang in range(3):  # English, Chinese and Japanese sides are all disjoint
        sets = {s: {t[lang] for t in a[s]} for s in a}
        assert {s: len(sets[s]) for s in sets} == sizes
        for s in sets:
            for t in sets:
                assert s == t or not (sets[s] & sets[t]), (s, t)
    # the retrieval split is drawn last: adding it leaves the other splits as they were
    assert {s: v for s, v in a.items() if s != "retrieval"} == \
        {s: v for s, v in corpus.make_splits(300, 40, 50, seed=0).items() if s != "retrieval"}


def test_grammar_runs_out_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(corpus, "PATTERN_WEIGHTS", {"copula": 1.0, "transitive": 0.0, "intransitive": 0.0})
    monkeypatch.setattr(corpus, "NOUNS", {k: corpus.NOUNS[k] for k in ("letter",)})
    with pytest.raises(RuntimeError, match="distinct sentences"):
        corpus.sample_sentences(100, seed=0)


# ----------------------------------------------------------------------------- sounds
def frame_env(x, hop=80):
    n = len(x) // hop
    return np.sqrt((x[:n * hop].reshape(n, hop) ** 2).mean(1))


def active(x, hop=80):
    """(start, end) sample ranges where the 5 ms RMS exceeds a quarter of its maximum."""
    on = frame_env(x, hop) > 0.25 * frame_env(x, hop).max()
    edges = np.flatnonzero(np.diff(np.r_[0, on.astype(int), 0]))
    return [(a * hop, b * hop) for a, b in zip(edges[::2], edges[1::2])]


def peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * corpus.SAMPLE_RATE / len(x)


def check_caption(x, cap):
    """Assert that the waveform x fits the caption cap (measured, not read from parameters)."""
    segs = active(x)
    lo_hi = corpus.PITCH_RANGES
    m = re.fullmatch(r"a (short|long) (low|medium|high) pitched tone", cap)
    if m:
        (a, b), = segs
        lo, hi = lo_hi[m[2]]
        assert lo - 5 <= peak_hz(x[a:b]) <= hi + 5, cap
        tlo, thi = corpus.TONE_LENGTHS[m[1]]
        assert tlo - 0.05 <= (b - a) / corpus.SAMPLE_RATE <= thi + 0.05, cap
        return
    m = re.fullmatch(r"a (low|medium|high) tone followed by a (low|medium|high) tone", cap)
    if m:
        assert len(segs) == 2, cap
        for (a, b), pitch in zip(segs, m.groups()):
            lo, hi = lo_hi[pitch]
            assert lo - 5 <= peak_hz(x[a:b]) <= hi + 5, cap
        return
    m = re.fullmatch(r"a (rising|falling) chirp", cap)
    if m:
        (a, b), = segs
        q = (b - a) // 4
        first, last = peak_hz(x[a:a + q]), peak_hz(x[b - q:b])
        assert (last > 2 * first) if m[1] == "rising" else (first > 2 * last), cap
        return
    m = re.fullmatch(r"(two|three|four|five) short (low|medium|high) pitched beeps", cap)
    if m:
        count = {v: k for k, v in corpus.COUNT_WORDS.items()}[m[1]]
        assert len(segs) == count, cap
        lo, hi = lo_hi[m[2]]
        a, b = segs[0]
        assert lo - 40 <= peak_hz(x[a:b]) <= hi + 40, cap  # 0.12 s beep: ~8 Hz bins, window spread
        return
    m = re.fullmatch(r"a (loud|soft) burst of noise", cap)
    if m:
        a, b = segs[0][0], segs[-1][1]
        power = np.abs(np.fft.rfft(x[a:b])) ** 2 + 1e-12
        flatness = np.exp(np.log(power).mean()) / power.mean()
        assert flatness > 0.3, cap  # white noise ~0.56; a tone ~0
        peak = np.abs(x).max()
        assert (peak > 0.5) if m[1] == "loud" else (peak < 0.15), cap
        return
    raise AssertionError(f"caption not understood by the test: {cap!r}")


def test_captions_match_their_sounds():
    rng = random.Random(7)
    seen = set()
    for _ in range(150):
        p = corpus.sample_sound(rng)
        x = corpus.render_sound(p)
        assert x.dtype == np.float32 and np.abs(x).max() <= 1.0
        assert 0.5 < len(x) / corpus.SAMPLE_RATE < 10
        check_caption(x, corpus.caption(p))
        seen.add(p["kind"])
    assert seen == set(corpus.SOUND_KINDS)


# ----------------------------------------------------------------------------- built corpus
def run_cli(out, *extra):
    cmd = [sys.executable, os.path.join(REPO, "demo", "corpus.py"), "--out", str(out), *SMALL, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small corpus built in-process with one worker."""
    if not have_speech():
        pytest.skip("no eSpeak NG: pip install espeakng-loader")
    out = tmp_path_factory.mktemp("corpus") / "c"
    summary = corpus.main(["--out", str(out), *SMALL, "--workers", "1"])
    return out, summary


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def manifest_files(out):
    return sorted(p for p in os.listdir(out) if p.endswith(".jsonl") and p != "meta.jsonl")


@needs_speech
def test_manifests_follow_the_contract(built):
    out, summary = built
    names = manifest_files(out)
    assert names == sorted(["asr_train.jsonl", "asr_dev.jsonl", "aac_train.jsonl", "aac_dev.jsonl",
                            "stage1_train.jsonl", "retrieval.jsonl"] +
                           [f"st_{l}_{s}.jsonl" for l in ("zh", "ja") for s in ("train", "dev", "test")])
    expected = {"asr_train.jsonl": 60, "asr_dev.jsonl": 10, "aac_train.jsonl": 20, "aac_dev.jsonl": 5,
                "stage1_train.jsonl": 80, "retrieval.jsonl": 12}
    entries = {}
    for name in names:
        rows = read_lines(out / name)
        entries[name] = rows
        n = expected[name] if name in expected else {"train": 60, "dev": 10, "test": 10}[name[6:-6]]
        assert len(rows) == n, name
        assert len({r["id"] for r in rows}) == len(rows), f"{name}: duplicate ids"
        for i, r in enumerate(rows, 1):
            where = f"{name} line {i}"
            assert r["task"] in CONTRACT_KEYS and set(r) == CONTRACT_KEYS[r["task"]], where
            assert isinstance(r["text"], str) and r["text"].strip(), where
            assert not os.path.isabs(r["audio"]) and (out / r["audio"]).is_file(), where
            if name.startswith("st_"):
                assert r["task"] == "st" and r["tgt_lang"] == name[3:5] and r["translation"].endswith("。"), where
            elif name.startswith("aac"):
                assert r["task"] == "aac", where
            elif not name.startswith("stage1"):
                assert r["task"] == "asr", where
    assert summary["manifests"] == {n: len(r) for n, r in entries.items()}
    # zh and ja manifests of a split share audio and transcripts; stage 1 is asr + aac train
    for split in ("train", "dev", "test"):
        zh, ja = entries[f"st_zh_{split}.jsonl"], entries[f"st_ja_{split}.jsonl"]
        assert [(r["audio"], r["text"]) for r in zh] == [(r["audio"], r["text"]) for r in ja]
    stage1 = entries["stage1_train.jsonl"]
    assert sorted(map(json.dumps, stage1)) == sorted(map(json.dumps, entries["asr_train.jsonl"] + entries["aac_train.jsonl"]))
    # splits disjoint in the manifests too (stage 2's retrieval utterances in none of the others, as LibriSpeech
    # test-clean is in none of the paper's training or test sets); text.txt holds train text only
    texts = {s: {r["text"] for r in entries[f"st_zh_{s}.jsonl"]} for s in ("train", "dev", "test")}
    texts["retrieval"] = {r["text"] for r in entries["retrieval.jsonl"]}
    assert all(a == b or not (texts[a] & texts[b]) for a in texts for b in texts)
    assert all(r["audio"].startswith("audio/retrieval/") for r in entries["retrieval.jsonl"])
    lines = set((out / "text.txt").read_text(encoding="utf-8").splitlines())
    for r in entries["st_zh_train.jsonl"] + entries["st_ja_train.jsonl"] + entries["aac_train.jsonl"]:
        assert r["text"] in lines and r.get("translation", r["text"]) in lines
    for r in entries["st_zh_test.jsonl"] + entries["st_ja_test.jsonl"] + entries["retrieval.jsonl"]:
        assert r["text"] not in lines and r.get("translation", r["text"]) not in lines
    assert summary["utterances"] == {"train": 60, "dev": 10, "test": 10, "retrieval": 12, "aac": 20, "aac_dev": 5}
    assert json.loads((out / "corpus.json").read_text()) == summary


@needs_speech
def test_audio_is_16k_mono_plausible_and_not_silent(built):
    out, summary = built
    rows = read_lines(out / "stage1_train.jsonl") + read_lines(out / "st_zh_dev.jsonl") + \
        read_lines(out / "st_zh_test.jsonl") + read_lines(out / "retrieval.jsonl") + read_lines(out / "aac_dev.jsonl")
    total = {}
    for r in rows:
        info = sf.info(out / r["audio"])
        assert (info.samplerate, info.channels) == (16000, 1), r["audio"]
        x, _ = sf.read(out / r["audio"], dtype="float32")
        assert 0.5 < len(x) / 16000 < 10, r["audio"]
        assert np.sqrt(np.mean(x ** 2)) > 0.01 and 0.05 < np.abs(x).max() <= 1.0, r["audio"]
        if r["task"] == "aac":
            check_caption(x, r["text"])  # the captions on disk match the sounds on disk
        else:  # speech: longer sentences give longer audio (about 2-4 words a second)
            words = len(r["text"].split())
            assert 0.15 * words < len(x) / 16000 < 1.0 * words + 1.0, (r["text"], len(x) / 16000)
        split = r["audio"].split("/")[1]
        total[split] = total.get(split, 0) + len(x) / 16000
    for split, sec in total.items():
        assert abs(summary["seconds"][split] - sec) < 0.2, split


@needs_speech
def test_same_seed_same_corpus_with_two_workers_via_cli(built, tmp_path):
    """Another build through the CLI with 2 workers: byte-identical manifests and identical audio."""
    out, _ = built
    other = tmp_path / "c2"
    res = run_cli(other, "--workers", "2")
    assert "made" in res.stderr
    for name in manifest_files(out) + ["text.txt", "corpus.json", "meta.jsonl"]:
        assert (out / name).read_bytes() == (other / name).read_bytes(), name
    for r in read_lines(out / "stage1_train.jsonl") + read_lines(out / "st_ja_test.jsonl"):
        a, _ = sf.read(out / r["audio"], dtype="int16")
        b, _ = sf.read(other / r["audio"], dtype="int16")
        assert np.array_equal(a, b), r["audio"]
    # another seed: other sentences, other file names
    third = tmp_path / "c3"
    corpus.main(["--out", str(third), *SMALL[2:], "--seed", "1", "--n-aac", "0", "--n-aac-dev", "0", "--workers", "1"])
    assert (third / "st_zh_train.jsonl").read_bytes() != (out / "st_zh_train.jsonl").read_bytes()


@needs_speech
def test_resume_skips_valid_files_and_remakes_broken_ones(built, tmp_path):
    out, summary = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    audio = sorted(str(p.relative_to(copy)) for p in (copy / "audio").rglob("*.flac"))
    assert len(audio) == 60 + 10 + 10 + 12 + 20 + 5
    before = {p: os.stat(copy / p).st_mtime_ns for p in audio}
    broken, missing = audio[3], audio[-2]
    original = {p: sf.read(copy / p, dtype="int16")[0] for p in (broken, missing)}
    (copy / broken).write_bytes((copy / broken).read_bytes()[:200])  # truncated file
    os.remove(copy / missing)
    again = corpus.main(["--out", str(copy), *SMALL, "--workers", "1"])
    assert again == summary
    for p in audio:
        if p in (broken, missing):
            assert np.array_equal(sf.read(copy / p, dtype="int16")[0], original[p]), p  # remade identically
        else:
            assert os.stat(copy / p).st_mtime_ns == before[p], f"{p} was rewritten"
    assert not list(copy.rglob("*.tmp*"))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="no espeak-ng program (apt-get install espeak-ng)")
def test_cli_fallback_backend(tmp_path):
    out, before = tmp_path / "cli", corpus._BACKEND
    summary = corpus.main(["--out", str(out), "--n-train", "4", "--n-dev", "2", "--n-test", "2", "--n-aac", "1",
                           "--n-aac-dev", "1", "--backend", "cli", "--workers", "1"])
    assert summary["backend"].startswith("eSpeak NG")
    corpus._BACKEND = before  # later tests get the lib backend back (auto prefers it)
    for r in read_lines(out / "st_ja_train.jsonl"):
        x, sr = sf.read(out / r["audio"], dtype="float32")
        assert sr == 16000 and x.ndim == 1 and 0.5 < len(x) / sr < 10 and np.abs(x).max() > 0.05


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--n-train"):
        corpus.main(["--out", str(tmp_path), "--n-train", "-1"])
    with pytest.raises(SystemExit, match="--rate"):
        corpus.main(["--out", str(tmp_path), "--rate", "200", "100"])
    with pytest.raises(ValueError, match="--backend"):
        corpus.get_backend("festival")
    assert "3000" in corpus.get_parser().format_help()  # defaults are shown in --help
