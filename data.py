"""Manifests, audio loading and batching for the speech LLM (no tokenizer here: the model tokenizes).

Manifest (JSON lines, one utterance per line; relative `audio` paths resolve against the manifest's folder):
    {"id": "cv_001", "audio": "clips/cv_001.mp3", "task": "st", "text": "Hello.", "translation": "你好。",
     "tgt_lang": "zh-CN"}
    task asr: text = transcript; aac: text = caption; st: text = source transcript, translation = target,
    tgt_lang = target language ("zh", "ja", ... CoVoST's "zh-CN" is accepted and stored as "zh").
SALMONN's `{"annotation": [{"path", "text", "task"}, ...]}` files (suffix .json) are read too, see SALMONN_TASKS.
Several manifests combine by list concatenation; WeightedMixSampler draws from them with mixing shares. Stage 1:
    asr, aac = read_manifest(a), read_manifest(b); ds = SpeechDataset(asr + aac)
    shares = mix_shares([len(asr), len(aac)], [w_asr, w_aac])   # by size (SALMONN), scaled by the weights
    sampler = WeightedMixSampler([len(asr), len(aac)], shares, seed=seed); sampler.set_epoch(epoch)
    order = list(sampler)   # the epoch's global order, the same on every rank
and train.py cuts each global batch of that order into the ranks' micro-batches itself (train.rank_micro_batches).
The sampler's own strided per-rank split (rank=, num_replicas=, as DistributedSampler) would group other items into
a micro-batch for another number of processes; training does not use it.

Audio: soundfile -> mean of channels -> soxr to 16 kHz -> float32, zero-padded to >= 1 s (as SALMONN),
cut to the Whisper checkpoint's input window (window_seconds(feature_extractor): n_samples / sampling_rate,
30 s for the real Whisper, shorter for a short-input one): both encoders see the same cut audio. SALMONN cuts
silently; here every cut is logged and counted.

Bad data: read_manifest() raises on the first broken line, or with skip_bad=True logs and skips it.
Audio is checked lazily in SpeechDataset.__getitem__ (a 290k-clip corpus costs minutes to scan at every
launch on every rank; a bad clip costs nothing until read). Bad audio = missing, undecodable, empty, or with
non-finite (NaN / Inf) samples (float WAVs can hold them; one would make every loss and distance NaN). It
raises naming the entry, or with skip_bad=True gives a Skipped(id, reason) marker, which the Collator drops.
Counts: each collated batch carries its own, batch["counts"] = {"bad_audio": n, "truncated": n} and the ids
of its skipped items in batch["skipped"], so the counts travel with the data out of DataLoader workers and
the training loop / evaluation can sum them over workers and ranks. The module-level Counter STATS
("bad_lines", "bad_audio", "truncated") counts what this process itself saw (manifest lines are read in the
main process; audio counted there only without workers).
"""
import json
import logging
import math
import os
import random
from collections import Counter

import numpy as np
import soundfile as sf
import soxr
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


class UserError(ValueError):
    """Bad input the user can fix (a manifest, flag, path or checkpoint): the scripts print the message alone,
    `<script>.py: error: <message>`, without a traceback (see runtime.cli). Any other exception is a bug and keeps
    its traceback."""


STATS = Counter()  # "bad_lines", "bad_audio", "truncated" seen by this process
TASKS = ("asr", "aac", "st")
SAMPLE_RATE = 16000

# ----------------------------------------------------------------------------- instructions

# CoVoST 2 En->X targets, plus English for X->En.
LANGUAGES = {"en": "English", "de": "German", "ca": "Catalan", "zh": "Chinese", "fa": "Persian",
             "et": "Estonian", "mn": "Mongolian", "tr": "Turkish", "ar": "Arabic", "sv": "Swedish",
             "lv": "Latvian", "sl": "Slovenian", "ta": "Tamil", "ja": "Japanese", "id": "Indonesian",
             "cy": "Welsh"}
DEFAULT_INSTRUCTIONS = {"asr": "Recognize the speech and give me the transcription.",
                        "aac": "Please describe the audio.",
                        "st": "Translate the speech into {lang}."}


def normalize_lang(code):
    """'zh-CN' -> 'zh', 'sv_SE' -> 'sv', 'JA' -> 'ja'. Raises ValueError for codes not in LANGUAGES.
    (Script/region is dropped: CoVoST's only Chinese target is zh-CN, Simplified.)"""
    lang = str(code).strip().replace("_", "-").split("-")[0].lower()
    if lang not in LANGUAGES:
        raise ValueError(f"unknown target language {code!r}; known: {', '.join(sorted(LANGUAGES))}")
    return lang


def _fill(template, task, tgt_lang):
    if task == "st":
        if tgt_lang is None:
            raise ValueError("task 'st' needs a target language (tgt_lang)")
        return template.replace("{lang}", LANGUAGES[normalize_lang(tgt_lang)])
    return template


def instruction(task, tgt_lang=None):
    """The fixed instruction: asr/aac as in SALMONN's prompt list, st "Translate the speech into X."
    as in Qwen2-Audio (the paper's prompt). tgt_lang is ignored unless task == 'st'."""
    if task not in DEFAULT_INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return _fill(DEFAULT_INSTRUCTIONS[task], task, tgt_lang)


SALMONN_SPEECH = "<Speech><SpeechHere></Speech>"  # where SALMONN's prompt files put the speech
# SALMONN prompt-file task -> (our task, target language); "translation_en2XX" -> ("st", XX) for XX in LANGUAGES
SALMONN_PROMPT_TASKS = {"asr": ("asr", None), "audiocaption": ("aac", None), "translation_ec": ("st", "zh"),
                        "translation_ce": ("st", "en")}
_WARNED = set()  # (path, message) already logged: one warning per file, however many Instructions read it


class Instructions:
    """Instruction per item: the fixed default (instruction()), or one of the alternatives in a JSON file, in
    either of two formats:
      * this project's {"asr": [...], "aac": [...], "st": ["... {lang} ..."]} (tasks left out keep the default;
        an unknown task is an error);
      * SALMONN's prompts/train_prompt.json (task -> list of prompts) or prompts/test_prompt.json (task -> one
        prompt), read as they are; recognised by the speech placeholder <Speech><SpeechHere></Speech> in its
        prompts. asr -> asr, audiocaption -> aac, translation_ec -> st into Chinese, translation_en2XX -> st into
        XX (translation_en2ja: Japanese), translation_ce -> st into English. The placeholder, which opens each of
        those prompts, is dropped: the template puts the speech before the instruction, as SALMONN's prompt does.
        The other tasks (asr_zh, QA, music, ...) are listed in one warning and not used. An st item whose target
        language has no prompt in the file keeps the default instruction.
    The pick for item `key` is random.Random(f"{seed}:{key}").choice(alternatives): seeded, the same in
    every DataLoader worker, every rank and every run, and different across items (not across epochs); evaluation
    (seed 0, key = manifest index) therefore picks deterministically, the same prompt in ST and MT mode.
    describe() says which prompts are in use (written to the runs' args.json / metrics.json)."""

    def __init__(self, path=None, seed=0):
        self.seed, self.path, self.format, self.ignored = seed, None if path is None else str(path), "default", []
        self.options = {t: [s] for t, s in DEFAULT_INSTRUCTIONS.items()}  # "asr", "aac", "st" ({lang}), "st:<lang>"
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(table, dict):
            raise UserError(f"{path}: expected a JSON object {{task: [instructions]}}")
        if any(SALMONN_SPEECH in p for v in table.values() for p in _strings(v)):
            self._read_salmonn(table, path)
            return
        self.format = "own"
        for task, options in table.items():
            if task not in TASKS:
                raise UserError(f"{path}: unknown task {task!r}; expected keys among {TASKS} (or SALMONN's prompt "
                                 f"file, whose prompts contain {SALMONN_SPEECH})")
            if not (isinstance(options, list) and options and all(isinstance(s, str) and s.strip() for s in options)):
                raise UserError(f"{path}: {task!r} must be a non-empty list of non-empty strings")
            if task == "st" and not all("{lang}" in s for s in options):
                raise UserError(f"{path}: every 'st' instruction needs the {{lang}} placeholder")
            self.options[task] = options

    def _read_salmonn(self, table, path):
        self.format = "salmonn"
        for name, value in table.items():
            task, lang = SALMONN_PROMPT_TASKS.get(name, (None, None))
            if task is None and name.startswith("translation_en2") and name[len("translation_en2"):] in LANGUAGES:
                task, lang = "st", name[len("translation_en2"):]
            if task is None:
                self.ignored.append(name)
                continue
            prompts = [value] if isinstance(value, str) else value
            if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
                raise UserError(f"{path}: {name!r} must be a prompt or a non-empty list of prompts")
            self.options[task if lang is None else f"st:{lang}"] = [_salmonn_instruction(p, path, name)
                                                                     for p in prompts]
        if self.ignored:
            msg = (f"{path}: SALMONN prompt tasks with no asr / aac / st counterpart here, not used: "
                   + ", ".join(self.ignored))
            if (path, msg) not in _WARNED:
                _WARNED.add((path, msg))
                log.warning(msg)

    def __call__(self, task, tgt_lang=None, key=0):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        options = self.options[task]
        if task == "st" and tgt_lang is not None:
            options = self.options.get(f"st:{normalize_lang(tgt_lang)}", options)
        template = options[0] if len(options) == 1 else random.Random(f"{self.seed}:{key}").choice(options)
        return _fill(template, task, tgt_lang)

    def describe(self):
        """{"path", "format" (default | own | salmonn), "seed", "prompts": {task or "st:<lang>": [instructions]},
        "ignored_tasks"}: the instructions items are drawn from (uniformly, seeded per item)."""
        return dict(path=self.path, format=self.format, seed=self.seed, prompts=dict(self.options),
                    ignored_tasks=list(self.ignored))


def _strings(value):
    """A prompt or a list of prompts -> the strings in it (anything else: none)."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [p for p in items if isinstance(p, str)]


def _salmonn_instruction(prompt, path, name):
    """SALMONN prompt -> the instruction: the leading <Speech><SpeechHere></Speech> dropped, spaces stripped."""
    text = prompt.strip()
    if text.startswith(SALMONN_SPEECH):
        text = text[len(SALMONN_SPEECH):].strip()
    elif SALMONN_SPEECH in text:
        raise UserError(f"{path}: {name!r}: {prompt!r} puts the speech inside the instruction; the templates here "
                         f"put it before the instruction (as SALMONN's own prompts do)")
    if not text:
        raise UserError(f"{path}: {name!r}: a prompt with no instruction")
    return text

# ----------------------------------------------------------------------------- manifests

# SALMONN annotation task -> (our task, target language). In SALMONN `text` is always the target, so
# for translation it becomes `translation` and the transcript is taken from an optional "transcript" field
# (None if absent: fine for cross-entropy training, not for the OT alignment, which needs transcripts).
# "translation_en2XX" -> XX; other "translation_*" names need a "tgt_lang" field; every other task (QA,
# music, ...) is unsupported. `id` defaults to the path; ids are not checked for duplicates (SALMONN lists
# one clip under several tasks).
SALMONN_TASKS = {"asr": ("asr", None), "asr_zh": ("asr", None), "asr_de": ("asr", None),
                 "audiocaption": ("aac", None), "audiocaption_v2": ("aac", None),
                 "translation_ec": ("st", "zh"), "translation_ce": ("st", "en")}


def _text(value, name):
    if value is None:
        raise ValueError(f"missing {name!r}")
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"empty {name!r}")
    return value.strip()


def _check(rec, folder, transcript_optional=False):
    """One manifest record (dict) -> entry dict, or ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for key in ("id", "audio", "task", "text"):
        if key not in rec:
            raise ValueError(f"missing field {key!r}")
    task = rec["task"]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    no_text = transcript_optional and task == "st" and rec["text"] is None
    entry = dict(id=_text(str(rec["id"]) if isinstance(rec["id"], int) else rec["id"], "id"), task=task,
                 text=None if no_text else _text(rec["text"], "text"),
                 audio=os.path.join(folder, _text(rec["audio"], "audio")), translation=None, tgt_lang=None)
    if task == "st":
        if not rec.get("tgt_lang"):
            raise ValueError("task 'st' without 'tgt_lang'")
        entry.update(translation=_text(rec.get("translation"), "translation"),
                     tgt_lang=normalize_lang(rec["tgt_lang"]))
    return entry


def _check_salmonn(ann, folder):
    if not isinstance(ann, dict) or "path" not in ann or "text" not in ann:
        raise ValueError("expected an object with 'path' and 'text'")
    name = str(ann.get("task", "asr"))  # SALMONN's default
    if "expand_wav" in ann:
        raise ValueError("'expand_wav' (concatenated clips) is not supported")
    task, lang = SALMONN_TASKS.get(name, (None, None))
    if task is None and name.startswith("translation_"):
        task, lang = "st", (name[len("translation_en2"):] if name.startswith("translation_en2") else ann.get("tgt_lang"))
        if not lang:
            raise ValueError(f"cannot tell the target language of task {name!r}: add a 'tgt_lang' field")
    if task is None:
        raise ValueError(f"unsupported SALMONN task {name!r}; supported: asr, aac, translation_* ({sorted(SALMONN_TASKS)})")
    rec = dict(id=ann.get("id", ann["path"]), audio=ann["path"], task=task, text=ann["text"])
    if task == "st":
        rec.update(text=ann.get("transcript"), translation=ann["text"], tgt_lang=lang)
    return _check(rec, folder, transcript_optional=True)


def read_manifest(path, skip_bad=False):
    """Read a JSON-lines manifest, or a SALMONN {"annotation": [...]} file if the name ends in .json.
    Returns a list of entries {id, audio (resolved path), task, text, translation, tgt_lang, where}
    (`where` = "file: line N" for error messages). A broken line (invalid JSON, missing field, unknown task,
    empty text/translation, st without tgt_lang, duplicate id in JSON lines) raises ValueError naming file and line;
    with skip_bad=True it is skipped instead: each reason is logged (logging.warning), the number of
    skipped lines is logged once and added to STATS["bad_lines"]; the return value is only the good entries."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise UserError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        if str(path).endswith(".json"):
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("annotation"), list):
                raise UserError(f'{path}: a .json manifest must be SALMONN\'s {{"annotation": [...]}}; use .jsonl for JSON lines')
            records = [(f"annotation[{i}]", a, _check_salmonn) for i, a in enumerate(doc["annotation"])]
        else:
            records = [(f"line {n}", line, _check) for n, line in enumerate(f, 1) if line.strip()]
    entries, seen, n_bad = [], set(), 0
    for where, rec, check in records:
        try:
            if isinstance(rec, str):
                try:
                    rec = json.loads(rec)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON ({e.msg})") from None
            entry = check(rec, folder)
            if check is _check and entry["id"] in seen:  # SALMONN files may list a clip twice
                raise ValueError(f"duplicate id {entry['id']!r}")
        except ValueError as e:
            if not skip_bad:
                raise UserError(f"{path}: {where}: {e}") from None
            log.warning("skipping %s: %s: %s", path, where, e)
            n_bad += 1
            continue
        seen.add(entry["id"])
        entries.append(dict(entry, where=f"{path}: {where}"))
    if n_bad:
        log.warning("%s: skipped %d bad of %d entries", path, n_bad, len(records))
        STATS["bad_lines"] += n_bad
    return entries

def read_nonempty(path, flag, skip_bad=False):
    """read_manifest for a flag of a stage script (--train, --dev): a UserError naming the flag and file when no
    entry is usable (under skip_bad: every line was skipped)."""
    entries = read_manifest(path, skip_bad=skip_bad)
    if not entries:
        raise UserError(f"{flag} {path}: no usable entry" + (" (every line was skipped as broken)" if skip_bad else ""))
    return entries

# ----------------------------------------------------------------------------- weighted mixture


def mix_shares(sizes, weights, by="size"):
    """Sampling share of each of K sources: share_k = w_k b_k / sum_j w_j b_j, with b_k = n_k (by="size": in
    proportion to the number of entries, as SALMONN's uniform draw from the concatenation of its data lists; a
    weight scales that share, e.g. 0.5 = as if the manifest had half its entries) or b_k = 1 (by="equal": every
    source the same base share, the weights are the shares). -> list of K floats summing to 1."""
    if by not in ("size", "equal"):
        raise ValueError(f"mix by 'size' or 'equal', got {by!r}")
    if len(sizes) != len(weights) or any(n <= 0 for n in sizes) or any(w < 0 for w in weights):
        raise ValueError(f"need one positive size and non-negative weight per source, got {sizes}, {weights}")
    mass = [w * (n if by == "size" else 1) for n, w in zip(sizes, weights)]
    if sum(mass) <= 0:
        raise ValueError(f"the sampling weights {weights} are all 0")
    return [m / sum(mass) for m in mass]


def mix_indices(sizes, weights, num_samples, seed=0):
    """Indices into the concatenation of K sources (entries = a + b + ...; sizes = [len(a), len(b), ...]).
    Each draw picks source k with probability w_k / sum(w), then that source's next item in a shuffled
    order that is reshuffled when used up: a small source repeats, a large one is subsampled, and no item
    of a source repeats before all of its items were drawn."""
    if len(sizes) != len(weights) or any(s <= 0 for s in sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need one positive size and non-negative weight per source (sum > 0), got {sizes}, {weights}")
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + list(sizes))
    which = rng.choice(len(sizes), size=num_samples, p=np.asarray(weights, float) / sum(weights))
    out = np.empty(num_samples, dtype=np.int64)
    for k, size in enumerate(sizes):
        pos = np.flatnonzero(which == k)
        order = np.concatenate([rng.permutation(size) for _ in range(max(1, math.ceil(len(pos) / size)))])
        out[pos] = offsets[k] + order[:len(pos)]
    return out.tolist()


class WeightedMixSampler(Sampler):
    """Sampler over concatenated sources with mixing weights, split across ranks like DistributedSampler:
    rank r of W gets every W-th index of one shared mix (same seed on all ranks), num_samples per epoch in
    total (rounded up to a multiple of W so every rank runs the same number of steps). Call set_epoch(e)
    each epoch for a new mix. The training loop takes the one-replica order and splits it itself (module docstring)."""

    def __init__(self, sizes, weights, num_samples=None, seed=0, rank=0, num_replicas=1):
        self.sizes, self.weights, self.seed, self.rank, self.num_replicas = sizes, weights, seed, rank, num_replicas
        self.num_samples = math.ceil((num_samples or sum(sizes)) / num_replicas)  # per rank
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        mix = mix_indices(self.sizes, self.weights, self.num_samples * self.num_replicas, self.seed + self.epoch)
        return iter(mix[self.rank::self.num_replicas])

    def __len__(self):
        return self.num_samples

# ----------------------------------------------------------------------------- audio


class AudioError(UserError):
    """An audio file that is missing, empty, cannot be decoded or holds non-finite samples."""


class Skipped:
    """What SpeechDataset gives for an unreadable item under skip_bad: its id and why (the Collator drops it,
    listing the id in batch["skipped"] and counting it in batch["counts"]["bad_audio"])."""

    def __init__(self, id, reason):
        self.id, self.reason = id, reason

    def __repr__(self):
        return f"Skipped({self.id!r}, {self.reason!r})"


def window_seconds(feature_extractor):
    """The input window of a Whisper checkpoint, from its feature extractor: n_samples / sampling_rate
    (30.0 for every released Whisper; a short-input one, like the demo's, has less). Longer clips are cut to it."""
    return feature_extractor.n_samples / feature_extractor.sampling_rate


def load_audio(path, sample_rate=SAMPLE_RATE, max_seconds=30.0):
    """Read any soundfile format (wav, flac, mp3, ogg, ...) -> (wav float32 (T,) mono at sample_rate,
    truncated: bool). Channels are averaged; resampling is soxr's band-limited "HQ" filter; T >= sample_rate
    (zero-padded to 1 s) and T <= max_seconds * sample_rate (longer audio is cut, logged, counted).
    Non-finite samples (NaN, Inf: possible in float WAV/FLAC) raise AudioError like an undecodable file."""
    path = str(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as f:
            sr, limit = f.samplerate, math.ceil(max_seconds * f.samplerate)
            wav = f.read(frames=limit + 1, dtype="float32", always_2d=True)  # no need to decode past 30 s
            total = f.frames
    except (RuntimeError, OSError) as e:  # sf.LibsndfileError is a RuntimeError
        raise AudioError(f"cannot decode audio file {path}: {e}") from None
    if len(wav) == 0:
        raise AudioError(f"audio file has no samples: {path}")
    bad = ~np.isfinite(wav)
    if bad.any():
        first = int(np.flatnonzero(bad.any(axis=1))[0])
        raise AudioError(f"audio file has {int(bad.sum())} non-finite samples (NaN or Inf; the first at "
                         f"{first / sr:.3f} s): {path}")
    truncated = len(wav) > limit
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    max_len = int(round(max_seconds * sample_rate))
    if truncated:
        STATS["truncated"] += 1
        log.warning("truncated %s from %.1f s to %.1f s", path, total / sr, max_seconds)
        wav = wav[:max_len]
    if len(wav) < sample_rate:  # as SALMONN: very short clips give BEATs too few fbank frames for a patch
        wav = np.concatenate([wav, np.zeros(sample_rate - len(wav), np.float32)])
    return np.ascontiguousarray(wav, dtype=np.float32), truncated

# ----------------------------------------------------------------------------- dataset and batches


class SpeechDataset(Dataset):
    """entries (from read_manifest) -> items {id, wav, instruction, target, transcript, task, tgt_lang, truncated}.
    target: asr -> text, aac -> caption (text), st -> translation; transcript: text for asr/st, None for aac.
    instructions: None (fixed defaults), an Instructions object, or the path of an alternatives JSON file.
    max_seconds: where audio is cut (give window_seconds(feature_extractor); the Collator cuts there too).
    A bad audio file raises AudioError naming the entry; with skip_bad=True the item is Skipped(id, reason)
    (logged, counted in STATS["bad_audio"] of this process) and the Collator drops it."""

    def __init__(self, entries, instructions=None, skip_bad=False, max_seconds=30.0):
        self.entries, self.skip_bad, self.max_seconds = list(entries), skip_bad, max_seconds
        self.instructions = instructions if isinstance(instructions, Instructions) else Instructions(instructions)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        try:
            wav, truncated = load_audio(e["audio"], SAMPLE_RATE, self.max_seconds)
        except AudioError as err:
            msg = f"entry {e['id']!r} ({e.get('where', 'no manifest')}): {err}"
            if not self.skip_bad:
                raise AudioError(msg) from None
            STATS["bad_audio"] += 1
            log.warning("skipping %s", msg)
            return Skipped(e["id"], msg)
        return dict(id=e["id"], wav=wav, task=e["task"], tgt_lang=e["tgt_lang"], truncated=truncated,
                    instruction=self.instructions(e["task"], e["tgt_lang"], key=i),
                    target=e["translation"] if e["task"] == "st" else e["text"],
                    transcript=None if e["task"] == "aac" else e["text"])


def is_empty(batch):
    """A collated batch with no item left (every clip unreadable under skip_bad), or None."""
    return batch is None or (isinstance(batch, dict) and "ids" in batch and not batch["ids"])


def batch_counts(batch):
    """{"bad_audio": n, "truncated": n} of a collated batch ({} for batches without counts)."""
    return dict(batch.get("counts", {})) if isinstance(batch, dict) else {}


class Collator:
    """list of items -> the batch dict that model.LSM takes:
    ids, mel (B, n_mels, frames) Whisper log-mel of the clip padded to Whisper's window, wav (B, T) zero-padded to
    the longest, wav_lens (B,) real samples, instructions, targets, transcripts, tasks, tgt_langs; and the batch's
    own record: skipped (ids of Skipped items, dropped), truncated (ids of cut clips), counts {"bad_audio",
    "truncated"}.
    A clip longer than Whisper's window (feature_extractor.n_samples) is cut to it here, for Whisper and BEATs
    alike, and counted as truncated (once, also when load_audio had already cut it). A batch with no item left
    is {"ids": [], "skipped": [...], "counts": {...}} (is_empty): the training loop runs no forward for it.
    feature_extractor: transformers.WhisperFeatureExtractor of the Whisper checkpoint (n_mels 80 or 128)."""

    def __init__(self, feature_extractor):
        if feature_extractor.sampling_rate != SAMPLE_RATE:
            raise UserError(f"feature extractor expects {feature_extractor.sampling_rate} Hz, data is {SAMPLE_RATE} Hz")
        self.feature_extractor = feature_extractor
        self.max_samples = int(feature_extractor.n_samples)
        seconds = window_seconds(feature_extractor)
        if seconds < 30.0:
            log.warning("this Whisper's input window is %.2f s (feature extractor n_samples %d), shorter than the "
                        "usual 30 s: longer clips are cut to %.2f s for Whisper and BEATs alike (counted as "
                        "'truncated')", seconds, self.max_samples, seconds)

    def __call__(self, items):
        skipped = [x.id for x in items if isinstance(x, Skipped)] + [None for x in items if x is None]
        items = [x for x in items if x is not None and not isinstance(x, Skipped)]
        wavs, truncated = [], []
        for x in items:
            too_long = len(x["wav"]) > self.max_samples
            if too_long:
                log.warning("truncated %r from %.2f s to Whisper's window of %.2f s", x["id"],
                            len(x["wav"]) / SAMPLE_RATE, self.max_samples / SAMPLE_RATE)
            if too_long or x.get("truncated"):
                truncated.append(x["id"])
            wavs.append(x["wav"][:self.max_samples])
        counts = {"bad_audio": len(skipped), "truncated": len(truncated)}
        if not items:
            return {"ids": [], "skipped": skipped, "truncated": truncated, "counts": counts}
        mel = self.feature_extractor(wavs, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
        lens = torch.tensor([len(w) for w in wavs], dtype=torch.long)
        wav = torch.zeros(len(wavs), int(lens.max()))
        for b, w in enumerate(wavs):
            wav[b, :len(w)] = torch.from_numpy(w)
        return {"ids": [x["id"] for x in items], "mel": mel.float(), "wav": wav, "wav_lens": lens,
                "instructions": [x["instruction"] for x in items], "targets": [x["target"] for x in items],
                "transcripts": [x["transcript"] for x in items], "tasks": [x["task"] for x in items],
                "tgt_langs": [x["tgt_lang"] for x in items], "skipped": skipped, "truncated": truncated,
                "counts": counts}
