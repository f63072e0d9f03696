"""prepare_data.py: every converter on a tiny folder tree that mimics the real layout and its quirks."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare_data as pd_
from prepare_data import DataError

KEYS = ["id", "audio", "task", "text", "translation", "tgt_lang"]


# ------------------------------------------------------------------------------------------------ helpers

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    for e in entries:
        assert list(e) == KEYS  # the contract's keys, in order, every time
    return entries


def read_dropped(path):
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert rows[0] == ["source", "line", "id", "reason", "detail"]
    return [tuple(r[1:4]) for r in rows[1:]]  # (line, id, reason)


def tone(seconds, sr, channels=1, levels=None):
    """A quiet sine; with `levels`, second k is a constant levels[k] instead (checkable after cutting)."""
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.2 * np.sin(2 * np.pi * 440 * t) if levels is None else np.asarray(levels)[t.astype(int)]
    wav = wav.astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def write_mp3(path, seconds=0.5, sr=48000):
    """A real 48 kHz MP3 like Common Voice's, or False if this libsndfile cannot encode MP3."""
    try:
        sf.write(path, tone(seconds, sr), sr, format="MP3", subtype="MPEG_LAYER_III")
        return True
    except Exception:
        Path(path).write_bytes(b"not really an mp3")
        return False


# ------------------------------------------------------------------------------------------------ CoVoST 2

VALIDATED_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent"
COVOST_HEADER = "path\tsentence\ttranslation\tclient_id\tsplit"


def make_covost(root, mp3=False):
    """Common Voice v4 folder + the two CoVoST tsvs, written exactly as pandas (QUOTE_NONE, escapechar \\)
    writes them: quotes stay raw, a tab inside a field is written as backslash + tab."""
    cv = root / "cv" / "en"
    (cv / "clips").mkdir(parents=True)
    validated = [
        ("u1", "common_voice_en_1.mp3", 'He said "hello" to me.'),
        ("u2", "common_voice_en_2.mp3", "Tab\\\there and a back\\\\slash."),  # -> 'Tab\there and a back\slash.'
        ("u3", "common_voice_en_3.mp3", "A train_covost row."),
        ("u4", "common_voice_en_4.mp3", "Clip file is missing."),
        ("u5", "common_voice_en_5.mp3", "Translation is empty."),
        ("u7", "common_voice_en_7.mp3", "A test row."),
        ("u8", "common_voice_en_8.mp3", ""),
        ("u9", "common_voice_en_9.mp3", "Only in validated."),
    ]
    lines = [VALIDATED_HEADER] + [f"{c}\t{p}\t{s}\t2\t0\t\t\t" for c, p, s in validated]
    (cv / "validated.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mp3_ok = True
    for _, p, _ in validated:
        if p == "common_voice_en_4.mp3":  # listed everywhere, but the clip is not in clips/
            continue
        if mp3:
            mp3_ok = write_mp3(cv / "clips" / p)
        else:
            (cv / "clips" / p).write_bytes(b"only its existence is checked")

    zh = [
        ("common_voice_en_1.mp3", "他说\"你好\"。", "train"),
        ("common_voice_en_2.mp3", "这里有\\\t制表符。", "train"),
        ("common_voice_en_3.mp3", "一行。", "train_covost"),
        ("common_voice_en_4.mp3", "文件丢失。", "dev"),
        ("common_voice_en_5.mp3", "", "test"),
        ("common_voice_en_6.mp3", "不在 validated 里。", "train"),
        ("common_voice_en_7.mp3", "测试。", "test"),
        ("common_voice_en_8.mp3", "句子为空。", "dev"),
    ]
    # labels get_covost_splits.py leaves out (the X->En tsvs carry them), on rows that would pass every check
    extra = [("common_voice_en_1.mp3", "多余。", "dev_covost"), ("common_voice_en_2.mp3", "多余。", "test_covost"),
             ("common_voice_en_3.mp3", "多余。", "dev_dup"), ("common_voice_en_7.mp3", "多余。", "test_dup")]
    lines = [COVOST_HEADER] + [f"{p}\tignored\t{t}\tc\t{s}" for p, t, s in zh] + [""] + \
        [f"{p}\tignored\t{t}\tc\t{s}" for p, t, s in extra]
    (root / "covost_v2.en_zh-CN.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ja = [("common_voice_en_1.mp3", "彼は「こんにちは」と言った。", "train"),
          ("common_voice_en_7.mp3", "テスト。", "test")]
    lines = [COVOST_HEADER] + [f"{p}\tignored\t{t}\tc\t{s}" for p, t, s in ja]
    (root / "covost_v2.en_ja.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cv, mp3_ok


def test_covost_join_splits_and_drops(tmp_path, capsys):
    cv, _ = make_covost(tmp_path)
    out = tmp_path / "out"
    summary = pd_.covost([tmp_path / "covost_v2.en_zh-CN.tsv", tmp_path / "covost_v2.en_ja.tsv"], cv, out)

    zh_train = read_jsonl(out / "covost2.en-zh.train.jsonl")
    assert [e["id"] for e in zh_train] == ["common_voice_en_1-zh", "common_voice_en_2-zh", "common_voice_en_3-zh"]
    first = zh_train[0]
    assert first == {"id": "common_voice_en_1-zh", "audio": str(cv / "clips" / "common_voice_en_1.mp3"),
                     "task": "st", "text": 'He said "hello" to me.', "translation": '他说"你好"。',
                     "tgt_lang": "zh"}
    assert zh_train[1]["text"] == "Tab\there and a back\\slash."   # escaped tab and backslash decoded
    assert zh_train[1]["translation"] == "这里有\t制表符。"
    assert zh_train[2]["text"] == "A train_covost row."            # train_covost joins train
    assert read_jsonl(out / "covost2.en-zh.dev.jsonl") == []
    assert [e["id"] for e in read_jsonl(out / "covost2.en-zh.test.jsonl")] == ["common_voice_en_7-zh"]
    ja_train = read_jsonl(out / "covost2.en-ja.train.jsonl")
    assert [(e["id"], e["translation"], e["tgt_lang"]) for e in ja_train] == \
        [("common_voice_en_1-ja", "彼は「こんにちは」と言った。", "ja")]
    assert len(read_jsonl(out / "covost2.en-ja.test.jsonl")) == 1

    # line numbers count the header as line 1 (and the blank line 10)
    assert read_dropped(out / "dropped.tsv") == [
        ("5", "common_voice_en_4-zh", "missing_audio"),
        ("6", "common_voice_en_5-zh", "empty_translation"),
        ("7", "common_voice_en_6-zh", "not_in_validated"),
        ("9", "common_voice_en_8-zh", "empty_sentence"),
        ("11", "common_voice_en_1-zh", "unused_split"),
        ("12", "common_voice_en_2-zh", "unused_split"),
        ("13", "common_voice_en_3-zh", "unused_split"),
        ("14", "common_voice_en_7-zh", "unused_split"),
    ]
    assert summary["dropped"] == {"missing_audio": 1, "empty_translation": 1, "not_in_validated": 1,
                                  "empty_sentence": 1, "unused_split": 4}
    assert summary["unused_splits"] == {"dev_covost": 1, "test_covost": 1, "dev_dup": 1, "test_dup": 1}
    assert summary["written"][str(out / "covost2.en-zh.train.jsonl")] == 3
    assert list(summary["written"]) == [str(out / f"covost2.en-{lang}.{split}.jsonl")
                                        for lang in ("zh", "ja") for split in ("train", "dev", "test")]
    printed = capsys.readouterr().out
    assert "(official: 289,430)" in printed and "(official: 15,531)" in printed
    assert "unused_split by label: dev_covost 1, test_covost 1, dev_dup 1, test_dup 1" in printed


def test_covost_relative_paths(tmp_path):
    cv, _ = make_covost(tmp_path)
    out = tmp_path / "out"
    pd_.covost([tmp_path / "covost_v2.en_ja.tsv"], cv, out, relative_paths=True)
    entry = read_jsonl(out / "covost2.en-ja.train.jsonl")[0]
    assert entry["audio"] == os.path.join("..", "cv", "en", "clips", "common_voice_en_1.mp3")
    assert (out / entry["audio"]).is_file()  # resolves against the manifest's folder


def test_covost_convert_flac_parallel_and_resumable(tmp_path, capsys):
    cv, mp3_ok = make_covost(tmp_path, mp3=True)
    if not mp3_ok:
        pytest.skip("this libsndfile cannot write MP3 (needs soundfile >= 0.12 with libsndfile >= 1.1)")
    (cv / "clips" / "common_voice_en_3.mp3").write_bytes(b"\xff\xfb garbage, not an mp3")
    out, flac = tmp_path / "out", tmp_path / "flac"
    tsvs = [tmp_path / "covost_v2.en_zh-CN.tsv", tmp_path / "covost_v2.en_ja.tsv"]
    summary = pd_.covost(tsvs, cv, out, convert_flac=flac, workers=2)

    # clips 1, 2, 3, 7 pass the checks; 1 and 7 are shared by zh and ja and converted once
    assert "audio converted 3, already done 0, failed 1" in capsys.readouterr().out
    train = read_jsonl(out / "covost2.en-zh.train.jsonl")
    assert [e["id"] for e in train] == ["common_voice_en_1-zh", "common_voice_en_2-zh"]
    assert train[0]["audio"] == str(flac / "common_voice_en_1.flac")
    assert summary["dropped"]["decode_error"] == 1
    assert ("4", "common_voice_en_3-zh", "decode_error") in read_dropped(out / "dropped.tsv")
    info = sf.info(str(flac / "common_voice_en_1.flac"))
    assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
    assert abs(info.frames - 8000) <= 160  # 0.5 s at 16 kHz, within a 10 ms codec delay
    wav, _ = sf.read(str(flac / "common_voice_en_1.flac"))
    assert 0.1 < np.abs(wav[1000:7000]).max() < 0.25  # the 0.2-amplitude tone survived resampling
    assert not list(flac.glob("*.tmp"))

    # resume: valid outputs are skipped, a broken one is rewritten
    (flac / "common_voice_en_7.flac").write_bytes(b"truncated")
    pd_.covost(tsvs, cv, out, convert_flac=flac, workers=2)
    assert "audio converted 1, already done 2, failed 1" in capsys.readouterr().out
    assert sf.info(str(flac / "common_voice_en_7.flac")).frames > 0


def test_covost_malformed_input(tmp_path):
    cv, _ = make_covost(tmp_path)
    bad = tmp_path / "covost_v2.en_de.tsv"
    bad.write_text(COVOST_HEADER + "\ncommon_voice_en_1.mp3\ts\tHallo\tc\ttrain\n"
                   "common_voice_en_2.mp3\ts\tein\tTab\tc\ttrain\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"covost_v2\.en_de\.tsv:3: 6 fields but the header has 5"):
        pd_.covost([bad], cv, tmp_path / "out")
    # a label get_covost_splits.py does not keep is left out as it leaves it out, counted, not an error
    bad.write_text(COVOST_HEADER + "\ncommon_voice_en_1.mp3\ts\tHallo\tc\tvalidation\n", encoding="utf-8")
    assert pd_.covost([bad], cv, tmp_path / "out")["unused_splits"] == {"validation": 1}
    bad.write_text("path\tsentence\ttranslations\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"en_de\.tsv:1: header lacks column\(s\) translation, split"):
        pd_.covost([bad], cv, tmp_path / "out")
    other = tmp_path / "covost_v2.de_en.tsv"
    other.write_text(COVOST_HEADER + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="En->X"):
        pd_.covost([other], cv, tmp_path / "out")
    with pytest.raises(DataError, match=r"covost_v2\.en_fr\.tsv: file not found"):
        pd_.covost([tmp_path / "covost_v2.en_fr.tsv"], cv, tmp_path / "out")
    assert pd_.covost_target("covost_v2.en_sv-SE.tsv") == "sv"


# ------------------------------------------------------------------------------------------------ LibriSpeech

def make_librispeech(root, name="test-clean", chapters=None):
    split = root / "LibriSpeech" / name
    chapters = chapters or {("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER", "I'M SURE I KNOW IT"],
                            ("121", "121726"): ["ALSO A POPULAR CONTRIVANCE", "MISSING AUDIO HERE"]}
    for (spk, chap), texts in chapters.items():
        folder = split / spk / chap
        folder.mkdir(parents=True)
        lines = [f"{spk}-{chap}-{i:04d} {t}" for i, t in enumerate(texts)]
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for i, t in enumerate(texts):
            if t != "MISSING AUDIO HERE":
                sf.write(folder / f"{spk}-{chap}-{i:04d}.flac", tone(0.1, 16000), 16000)
    return split


def test_librispeech(tmp_path):
    split = make_librispeech(tmp_path)
    out = tmp_path / "ls.jsonl"
    summary = pd_.librispeech([split], out)
    entries = read_jsonl(out)
    assert [e["id"] for e in entries] == ["1089-134686-0000", "1089-134686-0001", "121-121726-0000"]
    assert entries[0] == {"id": "1089-134686-0000", "audio": str(split / "1089/134686/1089-134686-0000.flac"),
                          "task": "asr", "text": "He hoped there would be stew for dinner",
                          "translation": None, "tgt_lang": None}
    assert entries[1]["text"] == "I'm sure I know it"
    assert read_dropped(tmp_path / "ls.dropped.tsv") == [("2", "121-121726-0001", "missing_audio")]
    assert summary["dropped"] == {"missing_audio": 1}

    pd_.librispeech([split], out, case="keep")
    assert [e["text"] for e in read_jsonl(out)][:2] == ["HE HOPED THERE WOULD BE STEW FOR DINNER", "I'M SURE I KNOW IT"]
    pd_.librispeech([split], out, case="lower")
    assert read_jsonl(out)[1]["text"] == "i'm sure i know it"


def test_librispeech_sentence_case_as_salmonn(tmp_path):
    """By default the text is exactly what SALMONN's data/example_data.json trains on for these utterances."""
    salmonn = [
        "Chapter one missus rachel lynde is surprised missus rachel lynde lived just where the avonlea main road "
        "dipped down into a little hollow fringed with alders and ladies eardrops and traversed by a brook",
        "That had its source away back in the woods of the old cuthbert place it was reputed to be an intricate "
        "headlong brook in its earlier course through those woods with dark secrets of pool and cascade but by the "
        "time it reached lynde's hollow it was a quiet well conducted little stream",
    ]
    split = make_librispeech(tmp_path, "train-clean-100", {("103", "1240"): [t.upper() for t in salmonn]})
    pd_.librispeech([split], tmp_path / "ls.jsonl")
    assert [(e["id"], e["text"]) for e in read_jsonl(tmp_path / "ls.jsonl")] == \
        [("103-1240-0000", salmonn[0]), ("103-1240-0001", salmonn[1])]


def test_librispeech_errors(tmp_path):
    with pytest.raises(DataError, match="no <speaker>/<chapter>/\\*.trans.txt"):
        pd_.librispeech([tmp_path], tmp_path / "x.jsonl")
    split = make_librispeech(tmp_path)
    trans = split / "121" / "121726" / "121-121726.trans.txt"
    trans.write_text("121-121726-0000 FINE\n121-999999-0001 WRONG CHAPTER\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"121-121726\.trans\.txt:2: expected 'UTTID TEXT'"):
        pd_.librispeech([split], tmp_path / "x.jsonl")


def test_recase():
    assert pd_.recase("WHAT IS IT? I DON'T KNOW. (YES) HE SAID", "sentence") == \
        "What is it? I don't know. (Yes) he said"
    assert pd_.recase("ABC", "keep") == "ABC"
    with pytest.raises(DataError, match="--case"):
        pd_.recase("ABC", "title")


# ------------------------------------------------------------------------------------------------ GigaSpeech

def make_gigaspeech(root):
    """GigaSpeech.json with one long wav (44.1 kHz stereo: resampled and downmixed when cut), one opus
    (the real format) and one recording that was never downloaded."""
    giga = root / "GigaSpeech"
    (giga / "audio" / "youtube" / "P0000").mkdir(parents=True)
    (giga / "audio" / "podcast" / "P0000").mkdir(parents=True)
    levels = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]  # second k of the wav holds the constant k/10
    sf.write(giga / "audio/youtube/P0000/YOU0000000001.wav", tone(6, 44100, channels=2, levels=levels), 44100)
    sf.write(giga / "audio/podcast/P0000/POD0000000001.opus", tone(3, 16000), 16000, format="OGG", subtype="OPUS")
    m, xl = ["{XL}", "{L}", "{M}", "{S}"], ["{XL}"]

    def seg(sid, b, e, text, subsets):
        return {"sid": sid, "speaker": "N/A", "begin_time": b, "end_time": e, "text_tn": text, "subsets": subsets}

    meta = {"dataset": "GigaSpeech", "audios": [
        {"aid": "YOU0000000001", "path": "audio/youtube/P0000/YOU0000000001.wav", "format": "wav",
         "sample_rate": 44100, "subsets": ["{XL}", "{M}"], "segments": [
             seg("YOU0000000001_S0000000", 1.0, 2.5,
                 "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE REALLY QUICKLY <QUESTIONMARK>", m),
             seg("YOU0000000001_S0000001", 2.5, 3.0, "<SIL>", m),
             seg("YOU0000000001_S0000002", 3.0, 4.0, "ONLY IN THE XL SUBSET <PERIOD>", xl),
             seg("YOU0000000001_S0000003", 4.0, 5.0, "<NOISE> WOW <EXCLAMATIONPOINT> <MUSIC>", m),
             seg("YOU0000000001_S0000004", 7.0, 8.0, "AFTER THE END OF THE AUDIO", m),
         ]},
        {"aid": "POD0000000001", "path": "audio/podcast/P0000/POD0000000001.opus", "format": "opus",
         "segments": [seg("POD0000000001_S0000000", 0.5, 2.0, "HELLO THERE <PERIOD>", m),
                      seg("POD0000000001_S0000001", 2.0, 3.0, "I MEAN <OTHER> YEAH <PERIOD>", m)]},
        {"aid": "POD0000000002", "path": "audio/podcast/P0000/POD0000000002.opus", "format": "opus",
         "segments": [seg("POD0000000002_S0000000", 0.0, 1.0, "NOT DOWNLOADED", m)]},
    ]}
    (giga / "GigaSpeech.json").write_text(json.dumps(meta), encoding="utf-8")
    return giga


def test_gigaspeech_text_drops_tagged_utterances():
    """An utterance holding any garbage tag is dropped whole, as GigaSpeech's README and toolkits do."""
    assert pd_.gigaspeech_text("I MEAN <OTHER> YEAH") == ("", "garbage_tag")
    assert pd_.gigaspeech_text("<NOISE> WOW <EXCLAMATIONPOINT>", "keep") == ("", "garbage_tag")
    assert pd_.gigaspeech_text("<MUSIC> <SIL>") == ("", "garbage_tag")
    assert pd_.gigaspeech_text("<COMMA>") == ("", "empty_text")
    assert pd_.gigaspeech_text("A <LAUGH> B") == ("<LAUGH>", "unknown_tag")


def test_gigaspeech_text_punctuation():
    """Dropped by default (LibriSpeech has none, GigaSpeech's toolkits remove it), kept on request."""
    assert pd_.gigaspeech_text("HI <COMMA> THERE <PERIOD>") == ("HI THERE", None)
    assert pd_.gigaspeech_text("HI <COMMA> THERE <PERIOD>", "keep") == ("HI, THERE.", None)
    assert pd_.gigaspeech_text("<COMMA> OK <QUESTIONMARK> <EXCLAMATIONPOINT>", "keep") == ("OK?!", None)
    with pytest.raises(DataError, match="--punctuation"):
        pd_.gigaspeech_text("HI", "strip")


def test_gigaspeech(tmp_path, capsys):
    giga = make_gigaspeech(tmp_path)
    segs, out = tmp_path / "segments", tmp_path / "giga_m.jsonl"
    summary = pd_.gigaspeech(giga / "GigaSpeech.json", segs, out, subset="M", workers=2)
    entries = read_jsonl(out)
    # sentence case without punctuation, as LibriSpeech comes out; tagged utterances dropped
    assert [(e["id"], e["text"]) for e in entries] == [
        ("YOU0000000001_S0000000", "As they're leaving can kash pull zahra aside really quickly"),
        ("POD0000000001_S0000000", "Hello there"),
    ]
    assert entries[0]["audio"] == str(segs / "YOU0000000001" / "YOU0000000001_S0000000.flac")
    assert {e["task"] for e in entries} == {"asr"}
    assert read_dropped(tmp_path / "giga_m.dropped.tsv") == [
        ("audios[0].segments[1]", "YOU0000000001_S0000001", "garbage_tag"),
        ("audios[0].segments[3]", "YOU0000000001_S0000003", "garbage_tag"),
        ("audios[1].segments[1]", "POD0000000001_S0000001", "garbage_tag"),
        ("audios[2].segments[0]", "POD0000000002_S0000000", "missing_audio"),
        ("audios[0].segments[4]", "YOU0000000001_S0000004", "decode_error"),
    ]
    assert summary["dropped"] == {"garbage_tag": 3, "missing_audio": 1, "decode_error": 1}
    printed = capsys.readouterr().out
    assert "gigaspeech: summary (case sentence, punctuation drop)" in printed
    assert "garbage_tag                  3" in printed

    wav, sr = sf.read(str(segs / "YOU0000000001" / "YOU0000000001_S0000000.flac"))
    assert sr == 16000 and wav.ndim == 1 and len(wav) == 24000          # 1.5 s, mono
    assert np.allclose(wav[200:15800], 0.1, atol=2e-3)                   # second 1 of the source ...
    assert np.allclose(wav[16200:23800], 0.2, atol=2e-3)                 # ... then second 2
    info = sf.info(str(segs / "POD0000000001" / "POD0000000001_S0000000.flac"))
    assert (info.samplerate, info.channels) == (16000, 1) and abs(info.frames - 24000) <= 160
    assert "audio converted 2, already done 0, failed 1" in printed      # dropped utterances are not cut
    assert not (segs / "YOU0000000001" / "YOU0000000001_S0000003.flac").exists()

    pd_.gigaspeech(giga / "GigaSpeech.json", segs, out, subset="{M}", workers=1)  # resumable, "{M}" accepted
    assert "audio converted 0, already done 2, failed 1" in capsys.readouterr().out

    pd_.gigaspeech(giga / "GigaSpeech.json", segs, tmp_path / "xl.jsonl", subset="XL", punctuation="keep")
    assert [e["text"] for e in read_jsonl(tmp_path / "xl.jsonl")][:2] == \
        ["As they're leaving, can kash pull zahra aside really quickly?", "Only in the xl subset."]
    pd_.gigaspeech(giga / "GigaSpeech.json", segs, tmp_path / "xl.jsonl", subset="XL", case="keep")
    assert read_jsonl(tmp_path / "xl.jsonl")[1]["text"] == "ONLY IN THE XL SUBSET"


def test_gigaspeech_errors(tmp_path):
    bad = tmp_path / "GigaSpeech.json"
    bad.write_text(json.dumps({"audios": [{"path": "a.opus", "segments": [{"sid": "x", "begin_time": 0}]}]}))
    with pytest.raises(DataError, match=r"audios\[0\]\.segments\[0\] lacks end_time, text_tn, subsets"):
        pd_.gigaspeech(bad, tmp_path / "s", tmp_path / "o.jsonl")
    bad.write_text("{not json")
    with pytest.raises(DataError, match="GigaSpeech.json: cannot read"):
        pd_.gigaspeech(bad, tmp_path / "s", tmp_path / "o.jsonl")
    with pytest.raises(DataError, match="--subset"):
        pd_.gigaspeech(bad, tmp_path / "s", tmp_path / "o.jsonl", subset="XXL")


# ------------------------------------------------------------------------------------------------ captioning

def test_audiocaps(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = [("91139", "r1kJmzUxIkI", "30", "A man speaks, then a dog barks, loudly"),
            ("58146", "gxVhAVNjSU0", "0", "Missing clip: the video was taken down"),
            ("11680", "Yi7IgtHCLSk", "10", "Water runs \"softly\" in a stream")]
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    sf.write(clips / "r1kJmzUxIkI.wav", tone(0.1, 16000), 16000)
    sf.write(clips / "YYi7IgtHCLSk.wav", tone(0.1, 16000), 16000)  # AudioSet-style "Y" prefix
    out = tmp_path / "ac.jsonl"
    summary = pd_.audiocaps(tmp_path / "train.csv", out, audio_dir=clips)
    entries = read_jsonl(out)
    assert entries[0] == {"id": "audiocaps-91139", "audio": str(clips / "r1kJmzUxIkI.wav"), "task": "aac",
                          "text": "A man speaks, then a dog barks, loudly", "translation": None, "tgt_lang": None}
    assert entries[1]["text"] == 'Water runs "softly" in a stream'
    assert entries[1]["audio"] == str(clips / "YYi7IgtHCLSk.wav")
    assert read_dropped(tmp_path / "ac.dropped.tsv") == [("3", "audiocaps-58146", "missing_audio")]
    assert summary["dropped"] == {"missing_audio": 1}

    sf.write(clips / "91139_30.flac", tone(0.1, 16000), 16000)
    pd_.audiocaps(tmp_path / "train.csv", out, audio_dir=clips, audio_pattern=["{audiocap_id}_{start_time}.flac"])
    assert [e["audio"] for e in read_jsonl(out)] == [str(clips / "91139_30.flac")]
    with pytest.raises(DataError, match="--audio-pattern.*'video'"):
        pd_.audiocaps(tmp_path / "train.csv", out, audio_dir=clips, audio_pattern=["{video}.wav"])


def test_clotho(tmp_path):
    dev = tmp_path / "development"
    dev.mkdir()
    sf.write(dev / "Radio Garble.wav", tone(0.1, 16000), 16000)
    captions = [["Radio Garble.wav", "A radio dispatcher talks, with static.", "People talk on a walkie-talkie.",
                 "", "Static, then voices.", "Bad audio quality radio."],
                ["Not Downloaded.wav", "a", "b", "c", "d", "e"]]
    with open(tmp_path / "clotho_captions_development.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerows(captions)
    out = tmp_path / "clotho.jsonl"
    summary = pd_.clotho(tmp_path / "clotho_captions_development.csv", out)  # audio dir guessed: development/
    entries = read_jsonl(out)
    assert [e["id"] for e in entries] == ["clotho-Radio Garble-1", "clotho-Radio Garble-2",
                                          "clotho-Radio Garble-4", "clotho-Radio Garble-5"]
    assert entries[0]["text"] == "A radio dispatcher talks, with static."
    assert entries[0]["audio"] == str(dev / "Radio Garble.wav") and entries[0]["task"] == "aac"
    assert summary["dropped"] == {"empty_text": 1, "missing_audio": 5}
    assert read_dropped(tmp_path / "clotho.dropped.tsv")[0] == ("2", "clotho-Radio Garble-3", "empty_text")


def test_wavcaps(tmp_path, capsys):
    audio = tmp_path / "SoundBible_flac"
    audio.mkdir()
    for name in ["2219.flac", "2217.flac", "Yb0RFKhbpFJA.flac", "300.wav"]:
        sf.write(audio / name, tone(0.1, 16000), 16000)
    data = {"num_captions_per_audio": 1, "data": [
        {"id": "2219", "caption": "An airplane is landing.", "duration": 14.14, "audio": "wav_path"},
        {"id": "2217", "caption": "It is raining heavily.", "duration": 186.4, "audio": "wav_path"},
        {"id": "Yb0RFKhbpFJA.wav", "caption": "Wind and a man speaking.", "duration": 10.0, "audio": "wav_path"},
        {"id": "404", "caption": "Never downloaded.", "duration": 3.0},
        {"id": "300", "caption": "No duration in the JSON: read from the file.", "wav_path": "300.wav"},
    ]}
    (tmp_path / "sb_final.json").write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "wc.jsonl"
    summary = pd_.wavcaps(tmp_path / "sb_final.json", out, audio_dir=audio)
    entries = read_jsonl(out)
    assert [(e["id"], Path(e["audio"]).name) for e in entries] == [
        ("wavcaps-sb_final-2219", "2219.flac"), ("wavcaps-sb_final-Yb0RFKhbpFJA", "Yb0RFKhbpFJA.flac"),
        ("wavcaps-sb_final-300", "300.wav")]
    assert entries[0]["text"] == "An airplane is landing." and entries[0]["task"] == "aac"
    assert read_dropped(tmp_path / "wc.dropped.tsv") == [
        ("data[1]", "wavcaps-sb_final-2217", "too_long"), ("data[3]", "wavcaps-sb_final-404", "missing_audio")]
    assert summary["dropped"] == {"too_long": 1, "missing_audio": 1}
    assert "too_long" in capsys.readouterr().out

    pd_.wavcaps(tmp_path / "sb_final.json", out, audio_dir=audio, max_seconds=0)  # 0 keeps all
    assert len(read_jsonl(out)) == 4
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"id": "1"}]}))
    with pytest.raises(DataError, match=r"bad\.json: data\[0\] lacks 'id' or 'caption'"):
        pd_.wavcaps(tmp_path / "bad.json", out)


def test_wavcaps_blacklist(tmp_path, capsys):
    """--blacklist drops what WavCaps' blacklist file lists for the JSON's own source (its AudioSet ids carry
    .wav, its FreeSound ids are numbers; id "2219" exists in several sources and is listed only for one)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ["Yb0RFKhbpFJA.flac", "YzzzQ1w2e3r4.flac", "2219.flac"]:
        sf.write(audio / name, tone(0.1, 16000), 16000)
    entries = {"as_final.json": ["Yb0RFKhbpFJA.wav", "YzzzQ1w2e3r4.wav"], "sb_final.json": ["2219"]}
    for name, ids in entries.items():
        data = {"num_captions_per_audio": 1,
                "data": [{"id": i, "caption": "A sound.", "duration": 10.0, "audio": "wav_path"} for i in ids]}
        (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
    blacklist = tmp_path / "blacklist_exclude_test_ac.json"
    blacklist.write_text(json.dumps({"AudioSet": ["Yb0RFKhbpFJA.wav"], "FreeSound": ["2219", "17"]}))

    out = tmp_path / "as.jsonl"
    summary = pd_.wavcaps(tmp_path / "as_final.json", out, audio_dir=audio, blacklist=blacklist)
    assert [e["id"] for e in read_jsonl(out)] == ["wavcaps-as_final-YzzzQ1w2e3r4"]
    assert read_dropped(tmp_path / "as.dropped.tsv") == [("data[0]", "wavcaps-as_final-Yb0RFKhbpFJA", "blacklisted")]
    assert summary["dropped"] == {"blacklisted": 1}
    assert "blacklisted" in capsys.readouterr().out
    summary = pd_.wavcaps(tmp_path / "sb_final.json", tmp_path / "sb.jsonl", audio_dir=audio, blacklist=blacklist)
    assert summary["written"] == {str(tmp_path / "sb.jsonl"): 1} and summary["dropped"] == {}

    blacklist.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"blacklist_exclude_test_ac\.json: expected a blacklist"):
        pd_.wavcaps(tmp_path / "as_final.json", out, audio_dir=audio, blacklist=blacklist)
    (tmp_path / "mine.json").write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match=r"mine\.json: --blacklist needs to know the WavCaps source"):
        pd_.wavcaps(tmp_path / "mine.json", out, blacklist=blacklist)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli(tmp_path, capsys):
    split = make_librispeech(tmp_path)
    out = tmp_path / "m" / "ls.jsonl"
    pd_.main(["librispeech", str(split), "--output", str(out), "--case", "lower", "--relative-paths"])
    entries = read_jsonl(out)
    assert entries[0]["text"] == "he hoped there would be stew for dinner"
    assert not os.path.isabs(entries[0]["audio"]) and (out.parent / entries[0]["audio"]).is_file()
    assert "wrote         3 entries" in capsys.readouterr().out

    with pytest.raises(SystemExit, match=r"prepare_data.py librispeech: error: .*no <speaker>"):
        pd_.main(["librispeech", str(tmp_path / "m"), "--output", str(out)])
    parser = pd_.build_parser()
    required = {"covost": ["--cv-dir", "c"], "gigaspeech": ["--segments-dir", "s"]}
    for command in ["covost", "librispeech", "gigaspeech", "audiocaps", "clotho", "wavcaps"]:
        args = parser.parse_args([command, "x", "--output", "o", *required.get(command, [])])
        assert args.command == command and args.func is getattr(pd_, command)
    args = parser.parse_args(["gigaspeech", "g.json", "--segments-dir", "s", "--output", "o"])
    assert (args.subset, args.case, args.punctuation) == ("M", "sentence", "drop")
    assert parser.parse_args(["gigaspeech", "g.json", "--segments-dir", "s", "--output", "o",
                              "--subset", "{xl}"]).subset == "XL"
    args = parser.parse_args(["wavcaps", "w.json", "--output", "o"])
    assert (args.max_seconds, args.blacklist) == (180.0, None)


@pytest.mark.parametrize("argv, flag", [
    (["gigaspeech", "g.json", "--segments-dir", "s", "--output", "o", "--workers", "0"], "--workers"),
    (["gigaspeech", "g.json", "--segments-dir", "s", "--output", "o", "--subset", "XXL"], "--subset"),
    (["gigaspeech", "g.json", "--segments-dir", "s", "--output", "o", "--punctuation", "strip"], "--punctuation"),
    (["librispeech", "x", "--output", "o", "--case", "title"], "--case"),
    (["wavcaps", "w.json", "--output", "o", "--max-seconds", "-1"], "--max-seconds"),
    (["wavcaps", "w.json", "--output", "o", "--max-seconds", "nan"], "--max-seconds"),
    (["wavcaps", "w.json", "--output", "o", "--blacklist", "no_such_blacklist.json"], "--blacklist"),
    (["wavcaps", "w.json", "--output", "o", "--audio-ext", "flac"], "--audio-ext"),
    (["audiocaps", "t.csv", "--output", "o", "--audio-pattern", "{video}.wav"], "--audio-pattern"),
])
def test_cli_checks_flags_at_parse_time(argv, flag, capsys):
    """A bad flag value stops before any file is read, with argparse's one line naming the flag."""
    with pytest.raises(SystemExit):
        pd_.build_parser().parse_args(argv)
    assert f"error: argument {flag}" in capsys.readouterr().err


def test_manifests_read_by_data_py(tmp_path):
    """The contract's reader accepts what every converter writes (absolute and relative audio paths)."""
    data = pytest.importorskip("data")
    cv, _ = make_covost(tmp_path)
    pd_.covost([tmp_path / "covost_v2.en_zh-CN.tsv"], cv, tmp_path / "out", relative_paths=True)
    entries = data.read_manifest(tmp_path / "out" / "covost2.en-zh.train.jsonl")
    assert [(e["id"], e["tgt_lang"]) for e in entries][0] == ("common_voice_en_1-zh", "zh")
    assert all(os.path.samefile(e["audio"], cv / "clips" / f"common_voice_en_{i}.mp3")
               for e, i in zip(entries, [1, 2, 3]))
    pd_.librispeech([make_librispeech(tmp_path)], tmp_path / "ls.jsonl")
    assert [e["task"] for e in data.read_manifest(tmp_path / "ls.jsonl")] == ["asr"] * 3
