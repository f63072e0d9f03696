r"""
Convert corpora you have already downloaded into AI-STA manifests. Nothing is downloaded here.

    python prepare_data.py covost      covost_v2.en_zh-CN.tsv covost_v2.en_ja.tsv --cv-dir cv4/en --output data/covost
    python prepare_data.py librispeech LibriSpeech/train-clean-100 LibriSpeech/train-clean-360 \
                                       LibriSpeech/train-other-500 --output data/librispeech_train.jsonl
    python prepare_data.py librispeech LibriSpeech/test-clean --output data/librispeech_test_clean.jsonl
    python prepare_data.py gigaspeech  GigaSpeech/GigaSpeech.json --subset M --segments-dir gigaspeech_m_flac \
                                       --output data/gigaspeech_m.jsonl
    python prepare_data.py audiocaps   audiocaps/train.csv --audio-dir audiocaps/train_wav \
                                       --output data/audiocaps_train.jsonl
    python prepare_data.py clotho      clotho/clotho_captions_development.csv --output data/clotho_dev.jsonl
    python prepare_data.py wavcaps     WavCaps/json_files/FreeSound/fsd_final.json --audio-dir WavCaps/FreeSound_flac \
                                       --output data/wavcaps_fsd.jsonl

Paper section 5.1: stage 1 uses LibriSpeech 960 h + GigaSpeech M (ASR), WavCaps without clips over 180 s,
AudioCaps and Clotho (audio captioning); stage 2 LibriSpeech test-clean; stage 3 CoVoST 2 En->Zh and En->Ja
(speech translation). docs/data.md has the whole sequence of commands, each corpus's size and access, and
the text conventions with their sources: CoVoST splits as get_covost_splits.py makes them; ASR transcripts in
sentence case without punctuation, as SALMONN's example training data; GigaSpeech utterances holding garbage
tags dropped, as its README says; the WavCaps blacklist an option, off by default.

Manifest format (README, "Manifests"): JSON lines, one utterance per line, always these six keys in this order
    {"id", "audio", "task": "asr"|"aac"|"st", "text", "translation", "tgt_lang"}
`text` is the transcript (asr, st) or the caption (aac); `translation` and `tgt_lang` are null except for st.
Text is written as UTF-8 (not \u-escaped). Ids are unique inside a manifest and, by construction, across
corpora (LibriSpeech/GigaSpeech keep their utterance ids, CoVoST ids carry the target language, the
captioning corpora get a corpus prefix), so several manifests can be concatenated.

Audio paths: absolute by default (a manifest can then be moved or copied anywhere). --relative-paths writes
them relative to the manifest's folder instead, which data.read_manifest resolves the same way; use it when
the manifests live inside the data folder and the whole tree moves together.

Every converter prints what it wrote and what it dropped by reason, and writes every dropped row (source
file, line or entry, id, reason, detail) to a TSV next to the manifest: <output stem>.dropped.tsv (CoVoST:
<output dir>/dropped.tsv). Malformed input (missing columns, a row with too many fields, a JSON entry
without a required key) stops with an error that names the file and line / entry.

Audio that needs cutting or converting (GigaSpeech segments; CoVoST with --convert-flac) is written as
16 kHz mono 16-bit FLAC in --workers processes, resumable: an output that exists and reads back as 16 kHz
mono with samples is skipped, and every file is written to a temporary name and then renamed, so a killed
run never leaves a truncated FLAC under the final name.
"""

import argparse
import csv
import inspect
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

SAMPLE_RATE = 16000  # every encoder in the model (Whisper, BEATs) runs at 16 kHz


class DataError(ValueError):
    """Malformed input: the message names the file and line (or JSON entry)."""


# ---------------------------------------------------------------------------------------------------------
# Shared machinery: bookkeeping of kept/dropped rows, text casing, audio conversion in worker processes
# ---------------------------------------------------------------------------------------------------------

class Report:
    """What one converter run keeps (per output manifest) and drops (with the reason).

    keep() refuses a second entry with the same id in the same manifest (counted as `duplicate_id`), so the
    manifests never hold ambiguous ids whatever the input does.
    """

    def __init__(self, name, conventions=""):
        self.name = name
        self.conventions = conventions  # printed with the summary, e.g. "case sentence, punctuation drop"
        self.kept = {}      # manifest path -> list of entries, in input order
        self.dropped = []   # (source, line, id, reason, detail)
        self._ids = set()

    def keep(self, manifest, entry, source, line):
        key = (str(manifest), entry["id"])
        if key in self._ids:
            self.drop(source, line, entry["id"], "duplicate_id", "an earlier row has the same id")
            return
        self._ids.add(key)
        self.kept.setdefault(str(manifest), []).append(entry)

    def drop(self, source, line, uid, reason, detail=""):
        self.dropped.append((str(source), str(line), str(uid), reason, str(detail)))

    def finish(self, dropped_tsv, relative_paths, manifests=(), expected=None):
        """Write the manifests (also empty ones listed in `manifests`) and the dropped TSV, print a summary.

        expected: optional {manifest: official row count} printed next to what was written.
        Returns {"written": {manifest: n}, "dropped": {reason: n}, "dropped_tsv": path}.
        """
        order = dict.fromkeys([*map(str, manifests), *self.kept])  # listed ones first, no repeats
        written = {}
        for manifest in order:
            entries = self.kept.get(manifest, [])
            write_manifest(entries, manifest, relative_paths)
            written[manifest] = len(entries)
        write_tsv(dropped_tsv, ["source", "line", "id", "reason", "detail"], self.dropped)
        reasons = Counter(d[3] for d in self.dropped)

        print(f"{self.name}: summary" + (f" ({self.conventions})" if self.conventions else ""))
        for manifest, n in written.items():
            official = (expected or {}).get(manifest)
            note = f"  (official: {official:,})" if official is not None else ""
            print(f"  wrote {n:>9,} entries to {manifest}{note}")
        print(f"  dropped {len(self.dropped):,} rows" + (":" if reasons else ""))
        for reason, n in reasons.most_common():
            print(f"    {reason:<20} {n:>9,}")
        print(f"  dropped rows listed in {dropped_tsv}")
        return {"written": written, "dropped": dict(reasons), "dropped_tsv": str(dropped_tsv)}


def make_entry(uid, audio, task, text, translation=None, tgt_lang=None):
    """One manifest line; the key order is the contract's."""
    return {"id": uid, "audio": str(audio), "task": task, "text": text,
            "translation": translation, "tgt_lang": tgt_lang}


def write_manifest(entries, path, relative_paths=False):
    """Write JSON lines atomically (temporary file + rename). Audio paths: absolute, or relative to the
    manifest's folder when relative_paths is set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)  # abspath, not resolve(): keep the user's symlinked paths
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            audio = os.path.abspath(e["audio"])
            e = dict(e, audio=os.path.relpath(audio, folder) if relative_paths else str(audio))
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_tsv(path, header, rows):
    """Plain TSV for humans and spreadsheets; tabs/newlines inside values become spaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in [header, *rows]:
            f.write("\t".join(re.sub(r"[\t\r\n]+", " ", str(v)) for v in row) + "\n")


def dropped_path(output):
    """train.jsonl -> train.dropped.tsv, next to the manifest."""
    output = Path(output)
    return output.with_name(output.stem + ".dropped.tsv")


CASES = ("sentence", "keep", "lower")


def recase(text, case):
    """--case sentence|keep|lower, for the upper-case ASR corpora (LibriSpeech, GigaSpeech).

    sentence: lower case, then upper-case the first letter of the text and of each word after . ? !,
              and the pronoun "I" (also in I'm, I'll, I've, I'd). Names stay lower case: no truecaser here.
              SALMONN's example training data (data/example_data.json) has LibriSpeech in this form,
              "Chapter one missus rachel lynde is surprised ...", and it matches CoVoST's normal-case text.
    keep:     unchanged (upper case).
    lower:    all lower case.
    """
    if case not in CASES:
        raise DataError(f"--case must be one of {', '.join(CASES)}, got {case!r}")
    if case == "keep":
        return text
    text = text.lower()
    if case == "lower":
        return text
    text = re.sub(r"\bi\b", "I", text)
    return re.sub(r"(^\W*|[.!?]\s+\W*)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def read_table(path, required, **csv_options):
    """Yield (line_number, row dict) from a delimited text file with a header line.

    Errors name the file and line: missing header columns, or a row with more fields than the header
    (what a wrong quoting/escaping setting produces). A row with fewer fields is padded with empty strings,
    as pandas does with na_filter=False; blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **csv_options)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header with columns {', '.join(required)}")
        except csv.Error as e:
            raise DataError(f"{path}:1: {e}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)}; found {header}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: {e}")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: after line {reader.line_num}: not UTF-8 ({e})")
            if not row:
                continue
            if len(row) > len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} fields but the header has "
                                f"{len(header)} (unescaped delimiter?)")
            row = row + [""] * (len(header) - len(row))
            yield reader.line_num, dict(zip(header, row))


def to_16k_mono(wav, sample_rate):
    """(frames, channels) float32 at any rate -> (frames',) float32 at 16 kHz, clipped to [-1, 1]
    (the resampler can overshoot by a little, and a 16-bit FLAC would wrap instead of clipping)."""
    wav = wav.mean(axis=1) if wav.ndim == 2 else wav
    if sample_rate != SAMPLE_RATE:
        wav = soxr.resample(wav, sample_rate, SAMPLE_RATE)  # band-limited, "HQ" quality
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


def write_flac(wav, path):
    """16 kHz mono 16-bit FLAC, written to a temporary name first and then renamed (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def is_done(path):
    """An output counts as done if it exists and reads back as 16 kHz mono with samples."""
    if not os.path.exists(path):
        return False
    try:
        info = sf.info(str(path))
    except Exception:  # unreadable: rewrite it
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0


def convert_clip(job):
    """Worker: (src, dst) -> (dst, status, detail); status is 'exists', 'converted' or 'error'.
    Errors are reported per file (one bad MP3 must not stop a 300k-clip run)."""
    src, dst = job
    if is_done(dst):
        return dst, "exists", ""
    try:
        wav, sr = sf.read(str(src), dtype="float32", always_2d=True)
        if len(wav) == 0:
            raise ValueError("no audio samples")
        write_flac(to_16k_mono(wav, sr), dst)
    except Exception as e:
        return dst, "error", f"{src}: {type(e).__name__}: {e}"
    return dst, "converted", ""


def cut_segments(job):
    """Worker: (src, [(key, begin_s, end_s, dst), ...]) -> [(key, status, detail), ...].

    Opens the long recording once and seeks to each segment, so memory stays at one segment (GigaSpeech
    recordings run for hours).
    """
    src, segments = job
    results = [(key, "exists", "") for key, _, _, dst in segments if is_done(dst)]
    todo = [s for s in segments if not is_done(s[3])]
    if not todo:
        return results
    try:
        f = sf.SoundFile(str(src))
    except Exception as e:
        return results + [(key, "error", f"{src}: {type(e).__name__}: {e}") for key, *_ in todo]
    with f:
        duration = f.frames / f.samplerate
        for key, begin, end, dst in todo:
            try:
                if begin >= duration:
                    raise ValueError(f"segment starts at {begin:.2f} s but the audio lasts {duration:.2f} s")
                f.seek(int(round(begin * f.samplerate)))
                wav = f.read(int(round((end - begin) * f.samplerate)), dtype="float32", always_2d=True)
                if len(wav) == 0:
                    raise ValueError("no audio samples")
                write_flac(to_16k_mono(wav, f.samplerate), dst)
                results.append((key, "converted", ""))
            except Exception as e:
                results.append((key, "error", f"{src} [{begin}-{end} s]: {type(e).__name__}: {e}"))
    return results


def run_parallel(fn, jobs, workers, desc):
    """Map fn over jobs in `workers` processes (in this process when workers <= 1) with a progress bar.
    Results come back in completion order; each carries its own key."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="job")]
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(fn, jobs, chunksize=chunk), total=len(jobs), desc=desc, unit="job"))


def print_audio_counts(name, statuses):
    counts = Counter(statuses)
    print(f"{name}: audio converted {counts['converted']:,}, already done {counts['exists']:,}, "
          f"failed {counts['error']:,}")


# ---------------------------------------------------------------------------------------------------------
# CoVoST 2 (En -> X speech translation)
# ---------------------------------------------------------------------------------------------------------

# get_covost_splits.py keeps these labels and leaves every other row out (dev_covost, test_covost, dev_dup and
# test_dup are reported in the X->En tsvs); such rows are dropped here as `unused_split` and counted per label.
COVOST_SPLITS = {"train": "train", "train_covost": "train", "dev": "dev", "test": "test"}
COVOST_OFFICIAL_ROWS = {"train": 289_430, "dev": 15_531, "test": 15_531}  # the same for every En->X pair
COVOST_TSV = dict(delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")  # as the official script's pandas


def covost_target(tsv):
    """covost_v2.en_zh-CN.tsv -> 'zh'; covost_v2.en_ja.tsv -> 'ja'. The region part is dropped
    (zh-CN -> zh, sv-SE -> sv) because the instruction and the BLEU tokenizer go by language."""
    m = re.fullmatch(r"covost_v2\.en_([A-Za-z]+)(-[A-Za-z]+)?\.tsv", Path(tsv).name)
    if not m:
        raise DataError(f"{tsv}: expected a CoVoST 2 En->X file named covost_v2.en_<lang>.tsv "
                        f"(e.g. covost_v2.en_zh-CN.tsv, covost_v2.en_ja.tsv)")
    return m.group(1).lower()


def covost(tsvs, cv_dir, output, convert_flac=None, workers=1, relative_paths=False):
    """CoVoST 2 En->X -> <output>/covost2.en-<lang>.{train,dev,test}.jsonl (task st).

    As the official get_covost_splits.py: the CoVoST tsv (path, translation, split) is inner-joined on
    `path` with Common Voice v4 validated.tsv (path, sentence), and the transcript comes from
    validated.tsv; train = splits train + train_covost, and rows with any other split label are left out
    (here: dropped as `unused_split`, counted per label). Beyond the official script, rows are dropped (and
    listed) when the clip is missing from clips/ or the sentence or translation is empty. Audio points at
    clips/<path> (48 kHz MP3) unless --convert-flac DIR writes DIR/<clip>.flac at 16 kHz (one file per clip,
    shared by all target languages).
    """
    cv_dir, output = Path(cv_dir), Path(output)
    validated_tsv, clips = cv_dir / "validated.tsv", cv_dir / "clips"
    for tsv in tsvs:
        if not Path(tsv).is_file():
            raise DataError(f"{tsv}: file not found")
    if not clips.is_dir():
        raise DataError(f"{clips}: Common Voice clips folder not found "
                        f"(--cv-dir must hold validated.tsv and clips/)")
    validated = read_table(validated_tsv, ["path", "sentence"], **COVOST_TSV)
    sentences = {row["path"]: row["sentence"] for _, row in validated}
    present = set(os.listdir(clips))  # one listing instead of 300k stat calls
    report = Report("covost")

    langs = {tsv: covost_target(tsv) for tsv in tsvs}  # fail on a wrong file before the long reads
    rows = []  # (manifest, entry, tsv, line, clip name) for every row that passes the checks
    manifests = []
    unused = Counter()  # split label -> rows left out, as get_covost_splits.py leaves them out
    for tsv, lang in langs.items():
        names = {s: output / f"covost2.en-{lang}.{s}.jsonl" for s in COVOST_OFFICIAL_ROWS}
        manifests += list(names.values())
        for line, row in read_table(tsv, ["path", "translation", "split"], **COVOST_TSV):
            clip = row["path"].strip()
            uid = f"{Path(clip).stem}-{lang}"
            split = COVOST_SPLITS.get(row["split"])
            sentence = sentences.get(clip)
            translation = row["translation"].strip()
            where = f"split={row['split']}"
            if split is None:
                unused[row["split"]] += 1
                report.drop(tsv, line, uid, "unused_split", f"{where}; get_covost_splits.py keeps only "
                                                             f"{', '.join(COVOST_SPLITS)}")
            elif sentence is None:
                report.drop(tsv, line, uid, "not_in_validated", f"{where}; {clip} not in {validated_tsv}")
            elif clip not in present:
                report.drop(tsv, line, uid, "missing_audio", f"{where}; {clips / clip} not found")
            elif not sentence.strip():
                report.drop(tsv, line, uid, "empty_sentence", f"{where}; empty in {validated_tsv}")
            elif not translation:
                report.drop(tsv, line, uid, "empty_translation", where)
            else:
                entry = make_entry(uid, clips / clip, "st", sentence.strip(), translation, lang)
                rows.append((names[split], entry, tsv, line, clip))

    failed = {}  # clip -> why it could not be converted
    if convert_flac:  # one FLAC per clip, shared by all target languages
        flac = {clip: Path(convert_flac) / f"{Path(clip).stem}.flac" for *_, clip in rows}
        clip_of = {str(dst): clip for clip, dst in flac.items()}
        results = run_parallel(convert_clip, [(clips / c, d) for c, d in flac.items()], workers, "covost -> flac")
        print_audio_counts("covost", [status for _, status, _ in results])
        failed = {clip_of[str(dst)]: detail for dst, status, detail in results if status == "error"}
    for manifest, entry, tsv, line, clip in rows:
        if clip in failed:
            report.drop(tsv, line, entry["id"], "decode_error", failed[clip])
            continue
        if convert_flac:
            entry["audio"] = str(flac[clip])
        report.keep(manifest, entry, tsv, line)

    expected = {str(m): COVOST_OFFICIAL_ROWS[m.name.split(".")[-2]] for m in manifests}
    summary = report.finish(output / "dropped.tsv", relative_paths, manifests, expected)
    if unused:
        print("  unused_split by label: " + ", ".join(f"{k} {n:,}" for k, n in unused.most_common()))
    return dict(summary, unused_splits=dict(unused))


# ---------------------------------------------------------------------------------------------------------
# LibriSpeech (ASR)
# ---------------------------------------------------------------------------------------------------------

def librispeech(folders, output, case="sentence", relative_paths=False):
    """LibriSpeech split folders (train-clean-100, test-clean, ...) -> one manifest (task asr).

    Layout: <folder>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt with lines "UTTID TEXT" and audio
    <folder>/<speaker>/<chapter>/<UTTID>.flac (16 kHz already). Pass several folders for the 960 h set.
    Transcripts are upper case without punctuation; --case sentence (default) writes them as SALMONN's
    example data has them.
    """
    recase("", case)  # a bad --case fails before the long walk
    report = Report("librispeech", f"case {case}")
    for folder in folders:
        folder = Path(folder)
        transcripts = sorted(folder.glob("*/*/*.trans.txt"))
        if not transcripts:
            raise DataError(f"{folder}: no <speaker>/<chapter>/*.trans.txt below it; pass a split folder "
                            f"such as LibriSpeech/train-clean-100")
        for trans in transcripts:
            chapter = trans.parent
            prefix = trans.name[: -len(".trans.txt")] + "-"
            flacs = set(os.listdir(chapter))
            with open(trans, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    uid, _, text = line.partition(" ")
                    if not re.fullmatch(r"\d+-\d+-\d+", uid) or not uid.startswith(prefix):
                        raise DataError(f"{trans}:{line_no}: expected 'UTTID TEXT' with UTTID {prefix}NNNN, "
                                        f"got {line[:60]!r}")
                    if not text.strip():
                        report.drop(trans, line_no, uid, "empty_text")
                    elif uid + ".flac" not in flacs:
                        report.drop(trans, line_no, uid, "missing_audio", f"{chapter / (uid + '.flac')} not found")
                    else:
                        entry = make_entry(uid, chapter / f"{uid}.flac", "asr", recase(text.strip(), case))
                        report.keep(output, entry, trans, line_no)
    return report.finish(dropped_path(output), relative_paths, [output])


# ---------------------------------------------------------------------------------------------------------
# GigaSpeech (ASR)
# ---------------------------------------------------------------------------------------------------------

GIGA_PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GIGA_GARBAGE = {"<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>"}
GIGA_SUBSETS = ("XS", "S", "M", "L", "XL", "DEV", "TEST")
PUNCTUATION = ("drop", "keep")


def gigaspeech_text(text_tn, punctuation="drop"):
    """GigaSpeech `text_tn` -> (text, problem).

    Garbage utterance tags (<SIL> <MUSIC> <NOISE> <OTHER>) mark audio that is not (only) speech: GigaSpeech's
    README recommends discarding these utterances and its toolkits (kaldi/gigaspeech_data_prep.sh) delete
    every one that holds such a tag, so such a text gives problem 'garbage_tag'. Punctuation tags are
    removed (punctuation 'drop', as those toolkits do and as LibriSpeech has none) or attached to the
    previous word ('keep': "HI <COMMA> THERE <PERIOD>" -> "HI, THERE."). problem is None, 'garbage_tag',
    'empty_text', or 'unknown_tag' (a tag this script does not know).
    """
    if punctuation not in PUNCTUATION:
        raise DataError(f"--punctuation must be one of {', '.join(PUNCTUATION)}, got {punctuation!r}")
    tokens = text_tn.split()
    if any(t in GIGA_GARBAGE for t in tokens):
        return "", "garbage_tag"
    words = []
    for tok in tokens:
        if tok in GIGA_PUNCTUATION:
            if words and punctuation == "keep":
                words[-1] += GIGA_PUNCTUATION[tok]
        elif tok.startswith("<") and tok.endswith(">"):
            return tok, "unknown_tag"
        else:
            words.append(tok)
    return " ".join(words), (None if words else "empty_text")


def gigaspeech(metadata, segments_dir, output, subset="M", audio_root=None, case="sentence", punctuation="drop",
               workers=1, relative_paths=False):
    """GigaSpeech metadata JSON -> one manifest of cut segments (task asr).

    Selects the segments whose `subsets` list holds {SUBSET} (subsets nest: XS < S < M < L < XL; DEV and
    TEST are separate). Each segment is cut from its long recording (`path`, relative to --audio-root,
    default the JSON's folder; opus or wav) into <segments-dir>/<recording>/<sid>.flac at 16 kHz. The JSON
    is loaded whole (the full GigaSpeech.json needs several GB of RAM). Text: utterances holding a garbage
    tag are dropped (`garbage_tag`), punctuation tags dropped or kept (--punctuation), then --case.
    """
    metadata = Path(metadata)
    audio_root = Path(audio_root) if audio_root else metadata.parent
    tag = "{" + subset.strip("{}").upper() + "}"
    if tag.strip("{}") not in GIGA_SUBSETS:
        raise DataError(f"--subset must be one of {', '.join(GIGA_SUBSETS)}, got {subset!r}")
    recase("", case)  # bad values fail before the JSON (several GB) loads
    gigaspeech_text("", punctuation)
    try:
        with open(metadata, encoding="utf-8") as f:
            audios = json.load(f)["audios"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{metadata}: cannot read GigaSpeech metadata ({type(e).__name__}: {e}); "
                        f"expected a JSON object with an 'audios' list")

    report = Report("gigaspeech", f"case {case}, punctuation {punctuation}")
    jobs, pending = [], []  # pending: (entry, where) until its segment file exists
    for i, audio in enumerate(audios):
        where = f"audios[{i}]"
        if not isinstance(audio, dict) or "path" not in audio or "segments" not in audio:
            raise DataError(f"{metadata}: {where} lacks 'path' or 'segments'")
        src = audio_root / audio["path"]
        recording = Path(audio["path"]).stem
        cuts = []
        for j, seg in enumerate(audio["segments"]):
            where = f"audios[{i}].segments[{j}]"
            missing = [k for k in ("sid", "begin_time", "end_time", "text_tn", "subsets") if k not in seg]
            if missing:
                raise DataError(f"{metadata}: {where} lacks {', '.join(missing)}")
            if tag not in seg["subsets"]:
                continue
            sid = seg["sid"]
            text, problem = gigaspeech_text(seg["text_tn"], punctuation)
            try:
                begin, end = float(seg["begin_time"]), float(seg["end_time"])
            except (TypeError, ValueError):
                raise DataError(f"{metadata}: {where}: begin_time/end_time must be seconds, "
                                f"got {seg['begin_time']!r}, {seg['end_time']!r}")
            if problem:
                report.drop(metadata, where, sid, problem, seg["text_tn"])
            elif not end > begin >= 0:
                report.drop(metadata, where, sid, "bad_times", f"begin {begin} end {end}")
            elif not src.is_file():
                report.drop(metadata, where, sid, "missing_audio", f"{src} not found")
            else:
                dst = Path(segments_dir) / recording / f"{sid}.flac"
                pending.append((make_entry(sid, dst, "asr", recase(text, case)), where))
                cuts.append((sid, begin, end, dst))
        if cuts:
            jobs.append((src, cuts))

    results = [r for rs in run_parallel(cut_segments, jobs, workers, "gigaspeech segments") for r in rs]
    print_audio_counts("gigaspeech", [status for _, status, _ in results])
    failed = {sid: detail for sid, status, detail in results if status == "error"}
    for entry, where in pending:  # metadata order
        if entry["id"] in failed:
            report.drop(metadata, where, entry["id"], "decode_error", failed[entry["id"]])
        else:
            report.keep(output, entry, metadata, where)
    return report.finish(dropped_path(output), relative_paths, [output])


# ---------------------------------------------------------------------------------------------------------
# Audio captioning: AudioCaps, Clotho, WavCaps (task aac)
# ---------------------------------------------------------------------------------------------------------

AUDIOCAPS_PATTERNS = ("{youtube_id}.wav", "{youtube_id}.flac", "Y{youtube_id}.wav")


def audiocaps(csv_path, output, audio_dir=None, audio_pattern=AUDIOCAPS_PATTERNS, relative_paths=False):
    """AudioCaps csv (audiocap_id, youtube_id, start_time, caption) -> one entry per caption.

    The audio of a row is the first of --audio-pattern (filled with the row's columns) that exists in
    --audio-dir (default: the csv's folder). YouTube videos disappear, so missing clips are expected;
    they are counted and listed, not fatal.
    """
    csv_path = Path(csv_path)
    audio_dir = Path(audio_dir) if audio_dir else csv_path.parent
    report = Report("audiocaps")
    for line, row in read_table(csv_path, ["audiocap_id", "youtube_id", "caption"]):
        uid = f"audiocaps-{row['audiocap_id']}"
        try:
            candidates = [audio_dir / p.format(**row) for p in audio_pattern]
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"--audio-pattern {list(audio_pattern)}: bad placeholder {e}; "
                            f"use columns of {csv_path}: {', '.join('{%s}' % k for k in row)}")
        audio = next((c for c in candidates if c.is_file()), None)
        if not row["caption"].strip():
            report.drop(csv_path, line, uid, "empty_text")
        elif audio is None:
            report.drop(csv_path, line, uid, "missing_audio", " | ".join(map(str, candidates)))
        else:
            report.keep(output, make_entry(uid, audio, "aac", row["caption"].strip()), csv_path, line)
    return report.finish(dropped_path(output), relative_paths, [output])


def clotho(csv_path, output, audio_dir=None, relative_paths=False):
    """Clotho captions csv (file_name, caption_1..caption_5) -> one entry per caption (5 per clip).

    --audio-dir defaults to the folder named after the csv's split next to it
    (clotho_captions_development.csv -> development/), else the csv's folder.
    """
    csv_path = Path(csv_path)
    if audio_dir is None:
        m = re.fullmatch(r"clotho_captions_(\w+)\.csv", csv_path.name)
        guess = csv_path.parent / m.group(1) if m else None
        audio_dir = guess if guess is not None and guess.is_dir() else csv_path.parent
    audio_dir = Path(audio_dir)
    report = Report("clotho")
    caption_columns = None
    for line, row in read_table(csv_path, ["file_name", "caption_1"]):
        if caption_columns is None:
            caption_columns = sorted((c for c in row if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c[8:]))
        name = row["file_name"]
        audio = audio_dir / name
        for column in caption_columns:
            uid = f"clotho-{Path(name).stem}-{column[8:]}"
            caption = row[column].strip()
            if not caption:
                report.drop(csv_path, line, uid, "empty_text", column)
            elif not audio.is_file():
                report.drop(csv_path, line, uid, "missing_audio", f"{audio} not found")
            else:
                report.keep(output, make_entry(uid, audio, "aac", caption), csv_path, line)
    return report.finish(dropped_path(output), relative_paths, [output])


WAVCAPS_MAX_SECONDS = 180.0  # paper 5.1: "WavCaps (with audio clips longer than 180 seconds removed)"
WAVCAPS_SOURCES = {"as": "AudioSet", "fsd": "FreeSound", "bbc": "BBC_Sound_Effects", "sb": "SoundBible"}


def wavcaps_blacklist(path, json_path):
    """The id stems a WavCaps blacklist file ({"AudioSet": [ids], "FreeSound": [ids]}, as in the release's
    json_files/blacklist/) lists for the source of json_path, told by its name (as_final.json -> AudioSet,
    fsd_final.json -> FreeSound; BBC and SoundBible have no list)."""
    source = WAVCAPS_SOURCES.get(Path(json_path).stem.split("_")[0])
    if source is None:
        raise DataError(f"{json_path}: --blacklist needs to know the WavCaps source; expected a file named "
                        f"as_*, fsd_*, bbc_* or sb_* (as_final.json, fsd_final.json, ...)")
    try:
        with open(path, encoding="utf-8") as f:
            lists = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the blacklist ({type(e).__name__}: {e})")
    if not isinstance(lists, dict) or not all(isinstance(v, list) for v in lists.values()):
        raise DataError(f"{path}: expected a blacklist {{\"AudioSet\": [ids], \"FreeSound\": [ids]}}")
    return source, {Path(str(i)).stem for i in lists.get(source, [])}


def wavcaps(json_path, output, audio_dir=None, audio_ext=(".flac", ".wav"), max_seconds=WAVCAPS_MAX_SECONDS,
            blacklist=None, relative_paths=False):
    """One WavCaps json file ({"data": [{"id", "caption", "duration", ...}]}, or a bare list) -> manifest.

    Audio: the entry's `audio` / `wav_path` if it holds a real path (the released files carry the
    placeholder "wav_path"), else <audio-dir>/<id> with the first of --audio-ext that exists (ids like
    "Yb0RFKhbpFJA.wav" lose their extension first, since the released audio is FLAC). Clips longer than
    --max-seconds (JSON `duration`, else read from the file) are dropped as `too_long`. With --blacklist
    (one of WavCaps' json_files/blacklist/*.json), the clips it lists for this source are dropped as
    `blacklisted` (WavCaps' own pretraining removes those overlapping the AudioCaps and Clotho test sets).
    """
    json_path = Path(json_path)
    audio_dir = Path(audio_dir) if audio_dir else json_path.parent
    source, listed = wavcaps_blacklist(blacklist, json_path) if blacklist else (None, set())
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: cannot read JSON ({type(e).__name__}: {e})")
    data = data.get("data") if isinstance(data, dict) else data
    if not isinstance(data, list):
        raise DataError(f"{json_path}: expected {{\"data\": [...]}} or a list of entries")

    limit = f"clips over {max_seconds:g} s dropped" if max_seconds else "no length limit"
    report = Report("wavcaps", limit + (f", blacklist {Path(blacklist).name}" if blacklist else ", no blacklist"))
    prefix = json_path.stem  # fsd_final, bbc_final, ...: ids repeat across the four sources
    for i, item in enumerate(data):
        where = f"data[{i}]"
        if not isinstance(item, dict) or "id" not in item or "caption" not in item:
            raise DataError(f"{json_path}: {where} lacks 'id' or 'caption'")
        stem = Path(str(item["id"])).stem
        uid = f"wavcaps-{prefix}-{stem}"
        if stem in listed:
            report.drop(json_path, where, uid, "blacklisted", f"listed under {source} in {blacklist}")
            continue
        given = item.get("audio", item.get("wav_path"))
        if given and given != "wav_path":
            candidates = [audio_dir / given]
        else:
            candidates = [audio_dir / (stem + ext) for ext in audio_ext]
        audio = next((c for c in candidates if c.is_file()), None)
        caption = str(item["caption"]).strip()
        try:
            duration = float(item["duration"]) if item.get("duration") is not None else None
        except (TypeError, ValueError):
            raise DataError(f"{json_path}: {where}: duration {item['duration']!r} is not a number")
        if duration is None and audio is not None:
            try:
                duration = sf.info(str(audio)).duration
            except Exception as e:
                report.drop(json_path, where, uid, "decode_error", f"{audio}: {type(e).__name__}: {e}")
                continue
        if not caption:
            report.drop(json_path, where, uid, "empty_text")
        elif duration is not None and max_seconds and duration > max_seconds:
            report.drop(json_path, where, uid, "too_long", f"{duration:.1f} s > {max_seconds:g} s")
        elif audio is None:
            report.drop(json_path, where, uid, "missing_audio", " | ".join(map(str, candidates)))
        else:
            report.keep(output, make_entry(uid, audio, "aac", caption), json_path, where)
    return report.finish(dropped_path(output), relative_paths, [output])


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def at_least(minimum, cast):
    """argparse type: a number of type `cast` that is >= minimum, checked at parse time."""
    def parse(text):
        value = cast(text)  # a ValueError becomes argparse's "invalid <cast> value"
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = cast.__name__
    return parse


def audiocaps_pattern(text):
    """argparse type: a clip file name pattern whose placeholders are AudioCaps csv columns."""
    try:
        text.format(audiocap_id=0, youtube_id="x", start_time=0, caption="x")
    except (KeyError, IndexError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: bad placeholder {e}; use {{audiocap_id}} {{youtube_id}} "
                                         f"{{start_time}}")
    return text


def extension(text):
    """argparse type: a file extension with its dot (.flac), so that <id><ext> is a file name."""
    if not re.fullmatch(r"\.\w+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an extension with its dot, such as .flac")
    return text


def existing_file(text):
    """argparse type: a path to an existing file, checked at parse time."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: file not found")
    return text


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help):
        s = sub.add_parser(name, help=help, description=inspect.cleandoc(fn.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.set_defaults(func=fn)
        s.add_argument("--relative-paths", action="store_true",
                       help="write audio paths relative to the manifest's folder (default: absolute)")
        return s

    def add_case(s, corpus):
        s.add_argument("--case", choices=CASES, default="sentence",
                       help=f"{corpus} is upper case: 'sentence' writes it as SALMONN's example training data has "
                            f"LibriSpeech ('Chapter one missus rachel lynde ...'), 'keep' leaves it upper case, "
                            f"'lower' lower-cases all (default: sentence)")

    def add_workers(s):
        s.add_argument("--workers", type=at_least(1, int), default=os.cpu_count() or 1,
                       help="processes converting audio (default: all CPUs)")

    s = command("covost", covost, "CoVoST 2 En->X tsvs + Common Voice v4 -> st manifests per split")
    s.add_argument("tsvs", nargs="+", metavar="TSV", help="covost_v2.en_zh-CN.tsv, covost_v2.en_ja.tsv, ...")
    s.add_argument("--cv-dir", required=True, help="Common Voice v4 English folder with validated.tsv and clips/")
    s.add_argument("--output", required=True, help="folder for covost2.en-<lang>.<split>.jsonl and dropped.tsv")
    s.add_argument("--convert-flac", metavar="DIR",
                   help="also convert the 48 kHz MP3 clips to 16 kHz mono FLAC in DIR (resumable) and point "
                        "the manifests at them (default: manifests point at the MP3s)")
    add_workers(s)

    s = command("librispeech", librispeech, "LibriSpeech split folders -> asr manifest")
    s.add_argument("folders", nargs="+", metavar="FOLDER", help="e.g. LibriSpeech/train-clean-100")
    s.add_argument("--output", required=True, help="manifest path (.jsonl)")
    add_case(s, "LibriSpeech")

    s = command("gigaspeech", gigaspeech, "GigaSpeech JSON -> cut 16 kHz FLAC segments + asr manifest")
    s.add_argument("metadata", metavar="JSON", help="GigaSpeech.json")
    s.add_argument("--subset", default="M", choices=GIGA_SUBSETS, type=lambda t: t.strip("{}").upper(),
                   help=f"one of {', '.join(GIGA_SUBSETS)}, braces and case optional (default: M, as the paper)")
    s.add_argument("--segments-dir", required=True, help="where the segment FLACs go")
    s.add_argument("--audio-root", help="folder the JSON's audio paths are relative to (default: the JSON's folder)")
    s.add_argument("--output", required=True, help="manifest path (.jsonl)")
    add_case(s, "GigaSpeech")
    s.add_argument("--punctuation", choices=PUNCTUATION, default="drop",
                   help="GigaSpeech's <COMMA> <PERIOD> <QUESTIONMARK> <EXCLAMATIONPOINT> tags: 'drop' them, as "
                        "its toolkits do and as LibriSpeech has none, or 'keep' them as , . ? ! (default: drop). "
                        "Utterances with <SIL> <MUSIC> <NOISE> <OTHER> are always dropped, as its README says")
    add_workers(s)

    s = command("audiocaps", audiocaps, "AudioCaps csv -> aac manifest")
    s.add_argument("csv_path", metavar="CSV", help="train.csv / val.csv / test.csv")
    s.add_argument("--audio-dir", help="folder with the downloaded clips (default: the csv's folder)")
    s.add_argument("--audio-pattern", nargs="+", type=audiocaps_pattern, default=list(AUDIOCAPS_PATTERNS),
                   help="clip file names to try, filled from the csv columns {audiocap_id} {youtube_id} "
                        f"{{start_time}} (default: {' '.join(AUDIOCAPS_PATTERNS)})")
    s.add_argument("--output", required=True, help="manifest path (.jsonl)")

    s = command("clotho", clotho, "Clotho captions csv -> aac manifest (one entry per caption)")
    s.add_argument("csv_path", metavar="CSV", help="clotho_captions_development.csv, ...")
    s.add_argument("--audio-dir", help="folder with the clips (default: development/ etc. next to the csv)")
    s.add_argument("--output", required=True, help="manifest path (.jsonl)")

    s = command("wavcaps", wavcaps, "one WavCaps json file -> aac manifest (clips over 180 s dropped)")
    s.add_argument("json_path", metavar="JSON", help="as_final.json, bbc_final.json, fsd_final.json or sb_final.json")
    s.add_argument("--audio-dir", help="folder with that source's clips (default: the JSON's folder)")
    s.add_argument("--audio-ext", nargs="+", type=extension, default=[".flac", ".wav"],
                   help="extensions to try (default: .flac .wav)")
    s.add_argument("--max-seconds", type=at_least(0, float), default=WAVCAPS_MAX_SECONDS,
                   help="drop longer clips; 0 keeps all (default: 180, as the paper)")
    s.add_argument("--blacklist", metavar="JSON", type=existing_file,
                   help="a WavCaps blacklist, e.g. json_files/blacklist/blacklist_exclude_test_ac.json (the clips "
                        "overlapping the AudioCaps and Clotho test sets, which WavCaps' own pretraining removes): "
                        "drop the clips it lists for this source (default: none, as the paper says nothing of it "
                        "and scores no captioning test set; see docs/data.md)")
    s.add_argument("--output", required=True, help="manifest path (.jsonl)")
    return p


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    command, fn = args.pop("command"), args.pop("func")
    try:
        return fn(**args)
    except DataError as e:
        sys.exit(f"prepare_data.py {command}: error: {e}")


if __name__ == "__main__":
    main()
