"""data.py: audio decoding/resampling, manifests and their errors, instructions, batching, samplers.
All audio is synthesized into tmp_path with numpy + soundfile."""
import json
import logging
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import WhisperFeatureExtractor

import data


def tone(freqs, seconds, sr, amp=0.5):
    t = np.arange(int(round(seconds * sr))) / sr
    return np.stack([amp * np.sin(2 * np.pi * f * t) for f in freqs], axis=1).astype(np.float32)


def write(path, seconds=1.0, sr=16000, freqs=(440.0,), **kw):
    sf.write(str(path), tone(freqs, seconds, sr), sr, **kw)
    return str(path)


def spectrum(wav, sr=16000):
    """Single-sided amplitude spectrum (a sine of amplitude a shows as a peak of height ~a)."""
    win = np.hanning(len(wav))
    amp = np.abs(np.fft.rfft(wav * win)) * 2 / win.sum()
    return np.fft.rfftfreq(len(wav), 1 / sr), amp


def write_manifest(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def fe():
    return WhisperFeatureExtractor(feature_size=80)

# ----------------------------------------------------------------------------- audio


def test_stereo_44k_is_mono_16k_mean_of_channels_same_frequencies(tmp_path):
    path = write(tmp_path / "st.wav", seconds=2.5, sr=44100, freqs=(1000.0, 3000.0))  # left 1 kHz, right 3 kHz
    wav, truncated = data.load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and not truncated
    assert len(wav) == 40000  # 2.5 s x 16 kHz
    freq, amp = spectrum(wav)
    top2 = sorted(freq[np.argsort(amp)[-2:]])
    assert top2 == pytest.approx([1000.0, 3000.0], abs=1.0)  # resampling kept both frequencies
    # mean of channels: each tone at half its amplitude (SALMONN would keep only the left channel)
    for f in (1000.0, 3000.0):
        assert amp[np.argmin(abs(freq - f))] == pytest.approx(0.25, rel=0.02)


def test_resampling_is_band_limited(tmp_path):
    # 10 kHz is above the new Nyquist (8 kHz): a naive decimator would alias it to 6 kHz
    wav, _ = data.load_audio(write(tmp_path / "hi.wav", seconds=1.0, sr=44100, freqs=(10000.0,)))
    freq, amp = spectrum(wav)
    assert amp.max() < 1e-3  # > 50 dB down from 0.5
    assert amp[np.argmin(abs(freq - 6000))] < 1e-3


@pytest.mark.parametrize("ext,fmt,subtype", [("flac", "FLAC", None), ("ogg", "OGG", "VORBIS"),
                                             ("mp3", "MP3", "MPEG_LAYER_III")])
def test_compressed_formats(tmp_path, ext, fmt, subtype):
    path = str(tmp_path / f"a.{ext}")
    try:
        sf.write(path, tone((1000.0,), 2.0, 48000), 48000, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, TypeError, ValueError) as e:
        pytest.skip(f"this libsndfile cannot write {fmt}: {e}")
    wav, truncated = data.load_audio(path)
    assert not truncated and wav.dtype == np.float32
    assert abs(len(wav) - 32000) <= (1200 if ext == "mp3" else 0)  # MP3 adds encoder delay/padding
    freq, amp = spectrum(wav)
    assert freq[np.argmax(amp)] == pytest.approx(1000.0, abs=1.0)
    assert amp.max() == pytest.approx(0.5, rel=0.1)


def test_short_audio_is_padded_to_one_second(tmp_path):
    x = tone((440.0,), 0.3, 16000)[:, 0]
    sf.write(str(tmp_path / "short.wav"), x, 16000, subtype="FLOAT")
    wav, truncated = data.load_audio(tmp_path / "short.wav")
    assert len(wav) == 16000 and not truncated
    np.testing.assert_array_equal(wav[:4800], x)  # 16 kHz float wav: read back exactly, no resampling
    assert not wav[4800:].any()


def test_long_audio_is_truncated_and_counted(tmp_path, caplog):
    long, exact = write(tmp_path / "long.wav", seconds=35.0), write(tmp_path / "exact.wav", seconds=30.0)
    before = data.STATS["truncated"]
    with caplog.at_level(logging.WARNING, logger="data"):
        wav, truncated = data.load_audio(long)
    assert len(wav) == 480000 and truncated
    assert data.STATS["truncated"] == before + 1
    assert "long.wav" in caplog.text and "35.0 s" in caplog.text
    wav, truncated = data.load_audio(exact)  # exactly 30 s is not truncated
    assert len(wav) == 480000 and not truncated and data.STATS["truncated"] == before + 1
    wav, truncated = data.load_audio(long, max_seconds=2.0)
    assert len(wav) == 32000 and truncated


def test_truncation_after_resampling_is_exact(tmp_path):
    wav, truncated = data.load_audio(write(tmp_path / "l44.wav", seconds=31.0, sr=44100))
    assert len(wav) == 480000 and truncated

# ----------------------------------------------------------------------------- manifests


def row(i, **kw):
    r = dict(id=f"u{i}", audio=f"clips/u{i}.wav", task="st", text=f"hello {i}", translation=f"你好 {i}",
             tgt_lang="zh-CN")
    r.update(kw)
    return {k: v for k, v in r.items() if v is not ...}


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "sub" / "clips").mkdir(parents=True)
    write(tmp_path / "sub" / "clips" / "u0.wav")
    absolute = write(tmp_path / "abs.wav")
    m = write_manifest(tmp_path / "sub" / "m.jsonl", [row(0), row(1, audio=absolute, task="asr")])
    entries = data.read_manifest(m)
    assert entries[0]["audio"] == str(tmp_path / "sub" / "clips" / "u0.wav")
    assert entries[1]["audio"] == absolute
    assert entries[0]["tgt_lang"] == "zh" and entries[0]["translation"] == "你好 0"  # zh-CN normalized
    assert entries[1]["translation"] is None and entries[1]["tgt_lang"] is None
    assert entries[0]["where"].endswith("m.jsonl: line 1")
    assert len(data.load_audio(entries[0]["audio"])[0]) == 16000


def test_broken_json_line_names_file_and_line(tmp_path):
    m = write_manifest(tmp_path / "broken.jsonl", [row(0), row(1), '{"id": "u2", "audio": ', row(3)])
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3: invalid JSON"):
        data.read_manifest(m)


@pytest.mark.parametrize("bad,message", [
    (dict(text=...), "missing field 'text'"),
    (dict(translation="  "), "empty 'translation'"),
    (dict(translation=...), "missing 'translation'"),
    (dict(tgt_lang=...), "task 'st' without 'tgt_lang'"),
    (dict(task="qa"), "unknown task 'qa'"),
    (dict(tgt_lang="xx"), "unknown target language 'xx'"),
    (dict(id="u0"), "duplicate id 'u0'"),
    (dict(text=""), "empty 'text'"),
])
def test_bad_lines_raise_or_are_skipped_and_counted(tmp_path, caplog, bad, message):
    m = write_manifest(tmp_path / "m.jsonl", [row(0), row(1), row(2, **bad), row(3)])
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3: " + message):
        data.read_manifest(m)
    before = data.STATS["bad_lines"]
    with caplog.at_level(logging.WARNING, logger="data"):
        entries = data.read_manifest(m, skip_bad=True)
    assert [e["id"] for e in entries] == ["u0", "u1", "u3"]
    assert data.STATS["bad_lines"] == before + 1
    assert "line 3" in caplog.text and message in caplog.text and "skipped 1 bad of 4" in caplog.text


def test_salmonn_annotation_format(tmp_path):
    write(tmp_path / "a.wav")
    ann = {"annotation": [
        {"path": "a.wav", "text": "hello world", "task": "asr"},
        {"path": "a.wav", "text": "a dog barks", "task": "audiocaption"},
        {"path": "a.wav", "text": "你好世界", "task": "translation_ec", "transcript": "hello world"},
        {"path": "a.wav", "text": "こんにちは", "task": "translation_en2ja"},
        {"path": "a.wav", "text": "Hallo", "task": "translation_ae", "tgt_lang": "de"},
        {"path": "a.wav", "text": "hi there"},  # SALMONN's default task is asr
        {"path": "a.wav", "text": "yes", "task": "QA", "Q": "Is it a dog?"},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"ann\.json: annotation\[6\]: unsupported SALMONN task 'QA'"):
        data.read_manifest(tmp_path / "ann.json")
    entries = data.read_manifest(tmp_path / "ann.json", skip_bad=True)
    got = [(e["task"], e["text"], e["translation"], e["tgt_lang"]) for e in entries]
    assert got == [("asr", "hello world", None, None), ("aac", "a dog barks", None, None),
                   ("st", "hello world", "你好世界", "zh"), ("st", None, "こんにちは", "ja"),
                   ("st", None, "Hallo", "de"), ("asr", "hi there", None, None)]
    assert all(e["audio"] == str(tmp_path / "a.wav") and e["id"] == "a.wav" for e in entries)
    ds = data.SpeechDataset(entries)
    assert ds[2]["target"] == "你好世界" and ds[2]["transcript"] == "hello world"
    assert ds[3]["transcript"] is None and ds[3]["instruction"] == "Translate the speech into Japanese."


def test_salmonn_translation_without_language_is_an_error(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": [{"path": "a.wav", "text": "x", "task": "translation_ae"}]}))
    with pytest.raises(ValueError, match=r"annotation\[0\]: cannot tell the target language of task 'translation_ae'"):
        data.read_manifest(tmp_path / "ann.json")

# ----------------------------------------------------------------------------- bad audio in the dataset


@pytest.fixture()
def bad_audio_manifest(tmp_path):
    (tmp_path / "clips").mkdir()
    for i in (0, 4):
        write(tmp_path / "clips" / f"u{i}.wav", seconds=1.5)
    sf.write(str(tmp_path / "clips" / "u2.wav"), np.zeros(0, np.float32), 16000)  # header only, 0 samples
    (tmp_path / "clips" / "u3.wav").write_bytes(np.random.default_rng(0).bytes(4096))  # not audio
    # u1.wav is missing
    return write_manifest(tmp_path / "m.jsonl", [row(i) for i in range(5)])


@pytest.mark.parametrize("index,message", [(1, "audio file not found"), (2, "no samples"),
                                           (3, "cannot decode audio file")])
def test_bad_audio_raises_naming_the_entry(bad_audio_manifest, index, message):
    ds = data.SpeechDataset(data.read_manifest(bad_audio_manifest))
    with pytest.raises(data.AudioError, match=rf"entry 'u{index}' \(.*m\.jsonl: line {index + 1}\): .*{message}.*u{index}\.wav"):
        ds[index]


def test_bad_audio_skipped_and_counted(bad_audio_manifest, fe, caplog):
    ds = data.SpeechDataset(data.read_manifest(bad_audio_manifest), skip_bad=True)
    before = data.STATS["bad_audio"]
    with caplog.at_level(logging.WARNING, logger="data"):
        items = [ds[i] for i in range(len(ds))]
    assert [isinstance(x, data.Skipped) for x in items] == [False, True, True, True, False]
    assert [x.id for x in items[1:4]] == ["u1", "u2", "u3"] and "not found" in items[1].reason
    assert data.STATS["bad_audio"] == before + 3
    assert all(f"entry 'u{i}'" in caplog.text for i in (1, 2, 3))
    batch = data.Collator(fe)(items)
    assert batch["ids"] == ["u0", "u4"] and batch["mel"].shape == (2, 80, 3000)
    assert batch["skipped"] == ["u1", "u2", "u3"] and batch["counts"] == {"bad_audio": 3, "truncated": 0}
    empty = data.Collator(fe)(items[1:3])  # nothing readable: an empty batch that still carries its record
    assert data.is_empty(empty) and empty["skipped"] == ["u1", "u2"] and empty["counts"]["bad_audio"] == 2
    assert data.is_empty(None) and not data.is_empty(batch)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_bad_audio(tmp_path, fe, value):
    """A float WAV can hold NaN / Inf; it must be refused like an undecodable file (issue 11.1): named, and skipped
    and counted under skip_bad, never passed on (one such clip made every loss and distance NaN)."""
    (tmp_path / "clips").mkdir()
    write(tmp_path / "clips" / "u0.wav", seconds=1.5)
    x = tone((440.0,), 2.0, 16000)[:, 0]
    x[8000] = value  # at 0.5 s
    sf.write(str(tmp_path / "clips" / "u1.wav"), x, 16000, subtype="FLOAT")
    assert not np.isfinite(sf.read(str(tmp_path / "clips" / "u1.wav"))[0]).all()  # the file really holds it
    with pytest.raises(data.AudioError, match=r"1 non-finite samples \(NaN or Inf; the first at 0\.500 s\): .*u1\.wav"):
        data.load_audio(tmp_path / "clips" / "u1.wav")
    m = data.read_manifest(write_manifest(tmp_path / "m.jsonl", [row(0), row(1)]))
    with pytest.raises(data.AudioError, match=r"entry 'u1' \(.*m\.jsonl: line 2\): .*non-finite"):
        data.SpeechDataset(m)[1]
    batch = data.Collator(fe)([data.SpeechDataset(m, skip_bad=True)[i] for i in (0, 1)])
    assert batch["ids"] == ["u0"] and batch["skipped"] == ["u1"] and torch.isfinite(batch["wav"]).all()


def test_short_whisper_window_cuts_both_encoders_inputs_and_counts(tmp_path, caplog):
    """Issue 11.12: with a Whisper whose input is 4 s (the demo's), a 6 s clip was cut for Whisper only while
    BEATs saw all of it. The cut now comes from the feature extractor (n_samples) and applies to the batch's wav
    (BEATs' input) as well; it is counted and warned about."""
    short = WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    assert short.n_samples == 64000 and data.window_seconds(short) == 4.0
    (tmp_path / "clips").mkdir()
    write(tmp_path / "clips" / "u0.wav", seconds=6.0)
    write(tmp_path / "clips" / "u1.wav", seconds=2.0)
    m = data.read_manifest(write_manifest(tmp_path / "m.jsonl", [row(0), row(1)]))
    with caplog.at_level(logging.WARNING, logger="data"):
        collate = data.Collator(short)
        assert "input window is 4.00 s" in caplog.text
        ds = data.SpeechDataset(m)  # default max_seconds 30: the Collator alone must still cut
        batch = collate([ds[0], ds[1]])
    assert batch["wav"].shape == (2, 64000) and batch["wav_lens"].tolist() == [64000, 32000]
    assert batch["mel"].shape == (2, 80, 400) and batch["counts"]["truncated"] == 1 and batch["truncated"] == ["u0"]
    assert "truncated 'u0' from 6.00 s" in caplog.text
    ds = data.SpeechDataset(m, max_seconds=data.window_seconds(short))  # as the scripts build it: no decoding past 4 s
    item = ds[0]
    assert item["truncated"] and len(item["wav"]) == 64000
    assert collate([item])["counts"]["truncated"] == 1  # counted once

# ----------------------------------------------------------------------------- instructions


def test_default_instructions():
    assert data.instruction("asr") == "Recognize the speech and give me the transcription."
    assert data.instruction("aac") == "Please describe the audio."
    assert data.instruction("st", "zh") == "Translate the speech into Chinese."
    assert data.instruction("st", "zh-CN") == "Translate the speech into Chinese."
    assert data.instruction("st", "ja") == "Translate the speech into Japanese."
    assert data.instruction("st", "de") == "Translate the speech into German."
    assert data.instruction("asr", "zh") == data.instruction("asr")
    covost = "de ca zh fa et mn tr ar sv lv sl ta ja id cy".split()
    assert len({data.instruction("st", lang) for lang in covost}) == 15
    with pytest.raises(ValueError, match="needs a target language"):
        data.instruction("st")
    with pytest.raises(ValueError, match="unknown target language 'xx'"):
        data.instruction("st", "xx")
    with pytest.raises(ValueError, match="unknown task"):
        data.instruction("sqa")


def test_instruction_alternatives_file(tmp_path):
    path = tmp_path / "instr.json"
    st = ["Translate the speech into {lang}.", "Please give the {lang} translation.", "Render it in {lang}."]
    path.write_text(json.dumps({"asr": ["Transcribe.", "Write it down."], "st": st}))
    ins = data.Instructions(path, seed=1)
    picks = [ins("st", "ja", key=k) for k in range(60)]
    assert set(picks) == {s.replace("{lang}", "Japanese") for s in st}  # all alternatives get used
    assert picks == [data.Instructions(path, seed=1)("st", "ja", key=k) for k in range(60)]  # seeded
    assert picks != [data.Instructions(path, seed=2)("st", "ja", key=k) for k in range(60)]
    assert {ins("asr", key=k) for k in range(30)} == {"Transcribe.", "Write it down."}
    assert ins("aac", key=5) == "Please describe the audio."  # not in the file: default
    path.write_text(json.dumps({"st": ["Translate it."]}))
    with pytest.raises(ValueError, match=r"instr\.json: .*\{lang\}"):
        data.Instructions(path)
    path.write_text(json.dumps({"sqa": ["?"]}))
    with pytest.raises(ValueError, match=r"instr\.json: unknown task 'sqa'"):
        data.Instructions(path)

# ----------------------------------------------------------------------------- batches


@pytest.fixture()
def mixed_manifest(tmp_path):
    (tmp_path / "clips").mkdir()
    for name, sec, sr in [("a", 1.2, 16000), ("b", 0.3, 22050), ("c", 2.0, 44100)]:
        write(tmp_path / "clips" / f"{name}.wav", seconds=sec, sr=sr)
    return write_manifest(tmp_path / "m.jsonl", [
        dict(id="a", audio="clips/a.wav", task="asr", text="the cat"),
        dict(id="b", audio="clips/b.wav", task="aac", text="a bird sings"),
        dict(id="c", audio="clips/c.wav", task="st", text="good morning", translation="おはよう", tgt_lang="ja")])


def test_collate_batch(mixed_manifest, fe):
    ds = data.SpeechDataset(data.read_manifest(mixed_manifest))
    items = [ds[i] for i in range(3)]
    batch = data.Collator(fe)(items)
    assert set(batch) == {"ids", "mel", "wav", "wav_lens", "instructions", "targets", "transcripts", "tasks", "tgt_langs",
                          "skipped", "truncated", "counts"}
    assert batch["skipped"] == [] and batch["counts"] == {"bad_audio": 0, "truncated": 0}
    assert batch["ids"] == ["a", "b", "c"]
    assert batch["mel"].shape == (3, 80, 3000) and batch["mel"].dtype == torch.float32
    assert batch["wav"].shape == (3, 32000) and batch["wav"].dtype == torch.float32
    assert batch["wav_lens"].tolist() == [19200, 16000, 32000] and batch["wav_lens"].dtype == torch.long
    for b, x in enumerate(items):
        n = len(x["wav"])
        np.testing.assert_array_equal(batch["wav"][b, :n].numpy(), x["wav"])
        assert not batch["wav"][b, n:].any()
    # each row's mel is the item's own log-mel (batching does not leak padding between rows)
    alone = fe(items[0]["wav"], sampling_rate=16000, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(batch["mel"][0], alone)
    assert batch["tasks"] == ["asr", "aac", "st"] and batch["tgt_langs"] == [None, None, "ja"]
    assert batch["targets"] == ["the cat", "a bird sings", "おはよう"]
    assert batch["transcripts"] == ["the cat", None, "good morning"]
    assert batch["instructions"] == ["Recognize the speech and give me the transcription.",
                                     "Please describe the audio.", "Translate the speech into Japanese."]


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # the 8 kHz extractor below
def test_mel_bins_follow_the_feature_extractor(mixed_manifest):
    ds = data.SpeechDataset(data.read_manifest(mixed_manifest))
    batch = data.Collator(WhisperFeatureExtractor(feature_size=128))([ds[0]])  # large-v3
    assert batch["mel"].shape == (1, 128, 3000)
    with pytest.raises(ValueError, match="8000 Hz"):
        data.Collator(WhisperFeatureExtractor(feature_size=80, sampling_rate=8000))


def test_dataloader_workers_and_distributed_sampler_cover_each_item_once(tmp_path, fe):
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(10):
        write(tmp_path / "clips" / f"u{i}.wav", seconds=1.0 + 0.1 * i)
        rows.append(row(i, task="asr" if i % 2 else "st"))
    ds = data.SpeechDataset(data.read_manifest(write_manifest(tmp_path / "m.jsonl", rows)))
    collate = data.Collator(fe)
    for obj in (ds, collate):  # what DataLoader workers need under spawn
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate)
        for batch in loader:
            assert batch["mel"].shape[0] == len(batch["ids"]) == batch["wav"].shape[0]
            lens = dict(zip(batch["ids"], batch["wav_lens"].tolist()))
            assert all(n == 16000 + 1600 * int(i[1:]) for i, n in lens.items())
            seen += batch["ids"]
    assert sorted(seen) == sorted(f"u{i}" for i in range(10))


def test_counts_leave_the_dataloader_workers(tmp_path, fe):
    """Issue 11.11: bad audio and truncations happen in DataLoader workers, whose STATS the main process never
    sees; the counts travel in the batches instead, so summing them over the loader counts every item once."""
    (tmp_path / "clips").mkdir()
    for i in range(8):
        if i not in (2, 5, 6):  # 2, 5, 6 missing
            write(tmp_path / "clips" / f"u{i}.wav", seconds=3.0 if i in (1, 7) else 1.0)  # 1, 7 longer than 2 s
    ds = data.SpeechDataset(data.read_manifest(write_manifest(tmp_path / "m.jsonl", [row(i) for i in range(8)])),
                            skip_bad=True, max_seconds=2.0)
    before = dict(data.STATS)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.Collator(fe))
    total, skipped = {"bad_audio": 0, "truncated": 0}, []
    for batch in loader:
        for key, n in data.batch_counts(batch).items():
            total[key] += n
        skipped += batch["skipped"]
    assert total == {"bad_audio": 3, "truncated": 2} and sorted(skipped) == ["u2", "u5", "u6"]
    assert dict(data.STATS) == before  # the main process saw none of it

# ----------------------------------------------------------------------------- weighted mixture


def test_mix_indices_weights_and_no_early_repeats():
    sizes, weights = [50, 1000], [3.0, 1.0]  # a small source weighted up, a big one subsampled
    idx = np.array(data.mix_indices(sizes, weights, 4000, seed=0))
    small = idx[idx < 50]
    assert len(small) / len(idx) == pytest.approx(0.75, abs=0.03)
    # the small source is cycled through whole shuffled passes: counts differ by at most one
    assert np.bincount(small, minlength=50).min() >= len(small) // 50
    assert np.bincount(small, minlength=50).max() <= len(small) // 50 + 1
    big = idx[idx >= 50]
    assert big.max() < 1050 and len(set(big.tolist())) == len(big)  # fewer draws than items: no repeats
    assert data.mix_indices(sizes, weights, 4000, seed=0) == idx.tolist()
    with pytest.raises(ValueError, match="one positive size"):
        data.mix_indices([10], [1.0, 2.0], 5)


def test_weighted_mix_sampler_rank_split():
    full = data.WeightedMixSampler([7, 5], [1.0, 1.0], num_samples=20, seed=3)
    parts = [data.WeightedMixSampler([7, 5], [1.0, 1.0], num_samples=20, seed=3, rank=r, num_replicas=2) for r in (0, 1)]
    assert len(full) == 20 and [len(p) for p in parts] == [10, 10]
    a, b = list(parts[0]), list(parts[1])
    merged = [x for pair in zip(a, b) for x in pair]
    assert merged == list(full)  # the ranks split one shared mix
    full.set_epoch(1)
    assert list(full) != merged  # a new mix each epoch
