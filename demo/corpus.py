"""A tiny spoken English -> Chinese / Japanese corpus that builds itself on a laptop CPU.

    python demo/corpus.py --out demo_out/corpus --seed 0 --n-train 3000 --n-dev 100 --n-test 1000 --n-retrieval 500

What it makes (all paths in the manifests are relative to --out, where the manifests live):

    audio/{train,dev,test,retrieval,aac,aac_dev}/<id>-<hash>.flac   16 kHz mono, 16-bit
    asr_train.jsonl, asr_dev.jsonl            task asr  (stage 1)
    aac_train.jsonl, aac_dev.jsonl            task aac  (stage 1: captions of synthetic sounds)
    stage1_train.jsonl                        asr_train + aac_train, shuffled (one file for pretrain.py)
    st_zh_{train,dev,test}.jsonl              task st, tgt_lang zh (stage 3 and evaluation)
    st_ja_{train,dev,test}.jsonl              task st, tgt_lang ja
    retrieval.jsonl                           task asr over the retrieval split (stage 2; written if --n-retrieval > 0)
    text.txt                                  every train-split sentence (en, zh, ja) and caption
    meta.jsonl                                per-utterance synthesis parameters (voice, rate, ...)
    corpus.json                               counts, vocabulary sizes, seed, backend, seconds

Sentences come from a small grammar (tables below) that renders each sentence in three languages
from one structure, so every pair is an exact translation by construction. The four speech splits share no
sentence. The retrieval split is held out from everything else, as the paper's stage-2 pairs (LibriSpeech
test-clean) are from its training and test sets: the layers are chosen on neither the test split nor a
sentence any stage trains on. Speech is eSpeak NG
(the `espeakng-loader` wheel's libespeak-ng through ctypes, or the `espeak-ng` program as a
fallback) with a voice, variant, rate and pitch drawn per utterance from the seeded RNG, resampled
22050 -> 16000 Hz with soxr. Captioned sounds (tones, chirps, beeps, noise) are made with numpy.

Every output is a pure function of the flags: two runs with the same seed write byte-identical
manifests and the same audio samples, whatever --workers is (see EspeakLib for what that takes).
A re-run skips audio files that already exist and decode; their names carry a hash of everything
that made them, so a changed flag never reuses a stale file. Cost of the default corpus (4600
utterances + 330 sounds, 2.5 h of audio, 193 MB of FLAC): about 45 CPU-seconds (~9 ms an utterance; measured as
78 CPU-s on a machine loaded ~5x, where CPU time runs ~1.7x long), so about 25 s on two free cores; a re-run that
finds everything takes ~8 s.
"""
import argparse
import ctypes
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
SPEECH_SPLITS = ("train", "dev", "test", "retrieval")
FORMAT_VERSION = 1  # bump when the rendering of audio changes, so old files are not reused

# =====================================================================================
# Lexicon. One row per word: English, Chinese, Japanese side by side, so a reader can check them.
# =====================================================================================

# Subject pronouns: English, Chinese, Japanese, English verb takes -s (third person singular).
PRONOUNS = {
    "I":    ("I",    "我",   "私",     False),
    "you":  ("you",  "你",   "あなた", False),
    "he":   ("he",   "他",   "彼",     True),
    "she":  ("she",  "她",   "彼女",   True),
    "we":   ("we",   "我们", "私たち", False),
    "they": ("they", "他们", "彼ら",   False),
}

# Nouns: singular, plural, Chinese, Chinese measure word (量词), Japanese, Japanese counter (助数詞),
# kind, adjectives the noun takes. Chinese never marks the plural (两只狗 "two dogs").
NOUNS = {
    #             en sg       en pl        zh      mw    ja        ctr   kind        adjectives
    "teacher":  ("teacher",  "teachers",  "老师", "个", "先生",   "人", "person",   ""),
    "doctor":   ("doctor",   "doctors",   "医生", "个", "医者",   "人", "person",   ""),
    "student":  ("student",  "students",  "学生", "个", "学生",   "人", "person",   ""),
    "child":    ("child",    "children",  "孩子", "个", "子供",   "人", "person",   ""),
    "friend":   ("friend",   "friends",   "朋友", "个", "友達",   "人", "person",   ""),
    "father":   ("father",   "fathers",   "父亲", "个", "父",     "人", "person",   ""),
    "mother":   ("mother",   "mothers",   "母亲", "个", "母",     "人", "person",   ""),
    "cat":      ("cat",      "cats",      "猫",   "只", "猫",     "匹", "animal",   "big small white black red"),
    "dog":      ("dog",      "dogs",      "狗",   "只", "犬",     "匹", "animal",   "big small white black"),
    "bird":     ("bird",     "birds",     "鸟",   "只", "鳥",     "羽", "animal",   "big small white black red beautiful"),
    "fish":     ("fish",     "fish",      "鱼",   "条", "魚",     "匹", "animal",   "big small red"),
    "horse":    ("horse",    "horses",    "马",   "匹", "馬",     "頭", "animal",   "big small white black beautiful"),
    "apple":    ("apple",    "apples",    "苹果", "个", "りんご", "個", "food",     "big small red"),
    "cake":     ("cake",     "cakes",     "蛋糕", "块", "ケーキ", "個", "food",     "big small white"),
    "egg":      ("egg",      "eggs",      "鸡蛋", "个", "卵",     "個", "food",     "big small white"),
    "book":     ("book",     "books",     "书",   "本", "本",     "冊", "readable", "big small old new red"),
    "letter":   ("letter",   "letters",   "信",   "封", "手紙",   "通", "readable", "old new"),
    "car":      ("car",      "cars",      "车",   "辆", "車",     "台", "thing",    "big small old new red white black"),
    "house":    ("house",    "houses",    "房子", "座", "家",     "軒", "thing",    "big small old new white beautiful"),
    "cup":      ("cup",      "cups",      "杯子", "个", "コップ", "個", "thing",    "big small old new red white"),
    "chair":    ("chair",    "chairs",    "椅子", "把", "椅子",   "脚", "thing",    "old new red black"),
    "umbrella": ("umbrella", "umbrellas", "伞",   "把", "傘",     "本", "thing",    "old new red black"),
    "pen":      ("pen",      "pens",      "笔",   "支", "ペン",   "本", "thing",    "old new red black"),
    "flower":   ("flower",   "flowers",   "花",   "朵", "花",     "本", "plant",    "small red white beautiful"),
    "tree":     ("tree",     "trees",     "树",   "棵", "木",     "本", "plant",    "big small beautiful"),
}
# Nouns that only take "my" (我的 / 私の: the humble 父 and 母 fit "my" and nothing else).
ONLY_MY = {"father", "mother"}

# Adjectives: English, Chinese before a noun, Chinese as a predicate, Japanese before a noun,
# Japanese as a predicate, group. One-syllable Chinese adjectives join the noun directly (大狗, 旧书);
# colours and 漂亮 take 的 before a noun and 是...的 / 很 as predicates. きれい is a na-adjective
# (きれいな花 / きれいです); the others are i-adjectives (大きい犬 / 大きいです). A copula sentence
# never pairs two adjectives of one group ("the small cup is big", "the red car is white").
ADJECTIVES = {
    "big":       ("big",       "大",     "很大",     "大きい",   "大きいです", "size"),
    "small":     ("small",     "小",     "很小",     "小さい",   "小さいです", "size"),
    "old":       ("old",       "旧",     "很旧",     "古い",     "古いです",   "age"),
    "new":       ("new",       "新",     "很新",     "新しい",   "新しいです", "age"),
    "red":       ("red",       "红色的", "是红色的", "赤い",     "赤いです",   "colour"),
    "white":     ("white",     "白色的", "是白色的", "白い",     "白いです",   "colour"),
    "black":     ("black",     "黑色的", "是黑色的", "黒い",     "黒いです",   "colour"),
    "beautiful": ("beautiful", "漂亮的", "很漂亮",   "きれいな", "きれいです", "looks"),
}

# Numbers: English, Chinese before a measure word (2 is 两, not 二), Japanese before a counter.
NUMBERS = {
    2: ("two",   "两", "二"),
    3: ("three", "三", "三"),
    4: ("four",  "四", "四"),
    5: ("five",  "五", "五"),
    6: ("six",   "六", "六"),
    7: ("seven", "七", "七"),
    8: ("eight", "八", "八"),
    9: ("nine",  "九", "九"),
}

# Determiners other than numbers: English, Chinese (MW = the noun's measure word), Japanese.
# "the" is rendered as a demonstrative (那+MW / その) so that every English sentence has one
# translation; "a" is 一+MW in Chinese and nothing in Japanese; "pl" is a bare plural ("cats").
DETERMINERS = {
    "the":  ("the",  "那MW", "その"),
    "a":    ("a",    "一MW", ""),
    "my":   ("my",   "我的", "私の"),
    "your": ("your", "你的", "あなたの"),
    "pl":   ("",     "",     ""),
}

# Transitive verbs: base, 3sg, Chinese, Japanese (polite), Japanese object particle, subject
# kinds, objects (kinds or noun keys), takes a time adverb. 好き takes が, not を:
# 彼女は犬が好きです "she likes dogs".
TRANSITIVE = {
    "see":  ("see",  "sees",    "看见", "見ます",     "を", "person animal", "person animal food readable thing plant", False),
    "like": ("like", "likes",   "喜欢", "好きです",   "が", "person animal", "person animal food readable thing plant", False),
    "buy":  ("buy",  "buys",    "买",   "買います",   "を", "person",        "animal food readable thing plant",        True),
    "read": ("read", "reads",   "读",   "読みます",   "を", "person",        "readable",                                True),
    "eat":  ("eat",  "eats",    "吃",   "食べます",   "を", "person animal", "food fish",                               True),
    "draw": ("draw", "draws",   "画",   "描きます",   "を", "person",        "person animal food thing plant",          True),
    "wash": ("wash", "washes",  "洗",   "洗います",   "を", "person",        "car cup chair dog horse apple",           True),
}

# Intransitive verbs: base, 3sg, Chinese, Japanese (polite), subject kinds, places.
INTRANSITIVE = {
    "run":   ("run",   "runs",    "跑步", "走ります",   "person animal", "park garden school"),
    "sing":  ("sing",  "sings",   "唱歌", "歌います",   "person",        "park garden school home"),
    "sleep": ("sleep", "sleeps",  "睡觉", "寝ます",     "person animal", "home garden park"),
    "play":  ("play",  "plays",   "玩",   "遊びます",   "person animal", "park garden school home"),
    "study": ("study", "studies", "学习", "勉強します", "person",        "school home library"),
}

# Places: English phrase, Chinese (after 在), Japanese (before で), animals may be there.
PLACES = {
    "park":    ("in the park",    "公园",   "公園",   True),
    "garden":  ("in the garden",  "花园",   "庭",     True),
    "school":  ("at school",      "学校",   "学校",   False),
    "home":    ("at home",        "家",     "家",     True),
    "library": ("in the library", "图书馆", "図書館", False),
}

# Time adverbs: English (sentence end), Chinese (after the subject), Japanese (after は).
TIMES = {
    "day":     ("every day",     "每天",     "毎日"),
    "morning": ("every morning", "每天早上", "毎朝"),
    "evening": ("every evening", "每天晚上", "毎晩"),
}

# =====================================================================================
# Rules. Three sentence patterns; word order per language:
#   transitive    en: S V O [T]         zh: S [T] V O。          ja: Sは [T] O(を|が) V。
#   intransitive  en: S V P [T]         zh: S [T] 在P V。        ja: Sは [T] Pで V。
#   copula        en: S is A            zh: S 很A / 是A的。      ja: Sは Aです。
# Noun phrases:   en: det [adj] noun(s)  zh: det(+MW) [adj] noun  ja: det(+counter+の) [adj] noun
# Restrictions (keep the sentences natural): no possessive with a 的-adjective in Chinese
# (avoids 我的红色的猫); no "I ... my" / "you ... your" (Japanese would repeat 私/あなた);
# "like" takes the / my / your / a bare plural, the other verbs a / the / my / your / numbers.
# =====================================================================================
PATTERN_WEIGHTS = {"transitive": 0.6, "intransitive": 0.2, "copula": 0.2}
P_ADJECTIVE = 0.5  # chance that a noun phrase gets an adjective (if its noun takes any)
P_TIME = 0.3       # chance of a time adverb where the verb takes one
OBJECT_DETS = ["a"] * 5 + ["the"] * 5 + ["my"] * 2 + ["your"] * 2 + list(NUMBERS)
LIKE_DETS = ["the", "my", "your", "pl", "pl"]
SUBJECT_DETS = ["the", "the", "my", "your"]


@dataclass(frozen=True)
class NP:
    """A noun phrase: det in DETERMINERS or an int in NUMBERS, adj in ADJECTIVES or None."""
    det: object
    noun: str
    adj: str = None


@dataclass(frozen=True)
class Sentence:
    """One sentence structure; render() turns it into (en, zh, ja).

    subj is a PRONOUNS key or an NP; verb a TRANSITIVE / INTRANSITIVE key (None for copula);
    obj an NP (transitive), place a PLACES key (intransitive), pred an ADJECTIVES key (copula).
    """
    pattern: str
    subj: object
    verb: str = None
    obj: NP = None
    place: str = None
    pred: str = None
    time: str = None


def np_en(p):
    sg, pl = NOUNS[p.noun][:2]
    plural = isinstance(p.det, int) or p.det == "pl"
    words = [NUMBERS[p.det][0] if isinstance(p.det, int) else DETERMINERS[p.det][0]]
    if p.adj:
        words.append(ADJECTIVES[p.adj][0])
    words.append(pl if plural else sg)
    if p.det == "a" and words[1][0] in "aeiou":  # in this lexicon a vowel letter = a vowel sound
        words[0] = "an"
    return " ".join(w for w in words if w)


def np_zh(p):
    zh, mw = NOUNS[p.noun][2:4]
    det = NUMBERS[p.det][1] + "MW" if isinstance(p.det, int) else DETERMINERS[p.det][1]
    adj = ADJECTIVES[p.adj][1] if p.adj else ""
    return det.replace("MW", mw) + adj + zh


def np_ja(p):
    ja, counter = NOUNS[p.noun][4:6]
    det = NUMBERS[p.det][2] + counter + "の" if isinstance(p.det, int) else DETERMINERS[p.det][2]
    adj = ADJECTIVES[p.adj][3] if p.adj else ""
    return det + adj + ja


def third_singular(subj):
    return PRONOUNS[subj][3] if isinstance(subj, str) else True  # NP subjects are singular


def render(s):
    """Sentence -> (English, Chinese, Japanese). English: lower case except "I", no final
    punctuation (a spoken transcript); Chinese and Japanese end with 。."""
    if isinstance(s.subj, str):
        s_en, s_zh, s_ja = PRONOUNS[s.subj][:3]
    else:
        s_en, s_zh, s_ja = np_en(s.subj), np_zh(s.subj), np_ja(s.subj)
    t_en, t_zh, t_ja = TIMES[s.time] if s.time else ("", "", "")
    if s.pattern == "transitive":
        base, v3, v_zh, v_ja, particle = TRANSITIVE[s.verb][:5]
        en = [s_en, v3 if third_singular(s.subj) else base, np_en(s.obj), t_en]
        zh = s_zh + t_zh + v_zh + np_zh(s.obj)
        ja = s_ja + "は" + t_ja + np_ja(s.obj) + particle + v_ja
    elif s.pattern == "intransitive":
        base, v3, v_zh, v_ja = INTRANSITIVE[s.verb][:4]
        p_en, p_zh, p_ja = PLACES[s.place][:3]
        en = [s_en, v3 if third_singular(s.subj) else base, p_en, t_en]
        zh = s_zh + t_zh + "在" + p_zh + v_zh
        ja = s_ja + "は" + t_ja + p_ja + "で" + v_ja
    elif s.pattern == "copula":
        a_en, _, a_zh, _, a_ja, _ = ADJECTIVES[s.pred]
        en = [s_en, "is", a_en]
        zh = s_zh + a_zh
        ja = s_ja + "は" + a_ja
    else:
        raise ValueError(f"unknown sentence pattern {s.pattern!r}")
    return " ".join(w for w in en if w), zh + "。", ja + "。"


def _nouns(spec):
    """'person food car' -> noun keys: a word is a kind (all its nouns) or a noun key."""
    words = spec.split()
    return [n for n, row in NOUNS.items() if row[6] in words or n in words]


def _sample_np(rng, nouns, dets):
    noun = rng.choice(nouns)
    det = "my" if noun in ONLY_MY else rng.choice(dets)
    if noun in ONLY_MY and "my" not in dets:
        return None
    adjs = NOUNS[noun][7].split()
    if det in ("my", "your"):  # no 我的红色的猫: possessive + 的-adjective reads badly in Chinese
        adjs = [a for a in adjs if "的" not in ADJECTIVES[a][1]]
    adj = rng.choice(adjs) if adjs and rng.random() < P_ADJECTIVE else None
    return NP(det, noun, adj)


def _sample_subject(rng, kinds):
    """A pronoun (people only) or a noun phrase of one of the kinds."""
    if "person" in kinds and rng.random() < 0.5:
        return rng.choice(list(PRONOUNS))
    return _sample_np(rng, _nouns(kinds), SUBJECT_DETS)


def sample_sentence(rng):
    """Draw one Sentence; returns None when a draw breaks a restriction (the caller redraws)."""
    pattern = rng.choices(list(PATTERN_WEIGHTS), weights=list(PATTERN_WEIGHTS.values()))[0]
    if pattern == "transitive":
        verb = rng.choice(list(TRANSITIVE))
        _, _, _, _, _, subj_kinds, obj_spec, timed = TRANSITIVE[verb]
        subj = _sample_subject(rng, subj_kinds)
        obj = _sample_np(rng, _nouns(obj_spec), LIKE_DETS if verb == "like" else OBJECT_DETS)
        if subj is None or obj is None or (subj, obj.det) in (("I", "my"), ("you", "your")):
            return None
        time = rng.choice(list(TIMES)) if timed and rng.random() < P_TIME else None
        return Sentence("transitive", subj, verb=verb, obj=obj, time=time)
    if pattern == "intransitive":
        verb = rng.choice(list(INTRANSITIVE))
        subj = _sample_subject(rng, INTRANSITIVE[verb][4])
        places = INTRANSITIVE[verb][5].split()
        if isinstance(subj, NP) and NOUNS[subj.noun][6] == "animal":
            places = [p for p in places if PLACES[p][3]]
        if subj is None or not places:
            return None
        time = rng.choice(list(TIMES)) if rng.random() < P_TIME else None
        return Sentence("intransitive", subj, verb=verb, place=rng.choice(places), time=time)
    # copula: "the old car is red"; the predicate adjective is of another group than the attributive
    subj = _sample_np(rng, [n for n in NOUNS if NOUNS[n][7]], SUBJECT_DETS)
    used = ADJECTIVES[subj.adj][5] if subj.adj else None
    preds = [a for a in NOUNS[subj.noun][7].split() if ADJECTIVES[a][5] != used]
    return Sentence("copula", subj, pred=rng.choice(preds)) if preds else None


def sample_sentences(n, seed):
    """n distinct sentences (distinct English), in draw order: a pure function of (n, seed)."""
    rng = random.Random(f"sentences-{seed}")
    seen, out = set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        s = sample_sentence(rng)
        if s is None:
            continue
        triple = render(s)
        if triple[0] not in seen:
            seen.add(triple[0])
            out.append(triple)
    raise RuntimeError(f"the grammar gave only {len(out)} distinct sentences after many draws; "
                       f"asked for {n} (lower --n-train/--n-dev/--n-test)")


def make_splits(n_train, n_dev, n_test, seed, n_retrieval=0):
    """{"train": [...], "dev": [...], "test": [...], "retrieval": [...]} of (en, zh, ja), disjoint by
    construction: all sentences are drawn distinct first, then test takes the first n_test, dev the next
    n_dev, train the next n_train and retrieval the rest (so --n-retrieval changes no other split)."""
    allsent = sample_sentences(n_train + n_dev + n_test + n_retrieval, seed)
    cut = [n_test, n_test + n_dev, n_test + n_dev + n_train]
    return {"test": allsent[:cut[0]], "dev": allsent[cut[0]:cut[1]], "train": allsent[cut[1]:cut[2]],
            "retrieval": allsent[cut[2]:]}


def lexicon_words():
    """Every English word the grammar can say (for corpus.json)."""
    words = {"is", "an", "in", "at", "every"}
    for table, cols in ((PRONOUNS, [0]), (NOUNS, [0, 1]), (ADJECTIVES, [0]), (NUMBERS, [0]),
                        (DETERMINERS, [0]), (TRANSITIVE, [0, 1]), (INTRANSITIVE, [0, 1]),
                        (PLACES, [0]), (TIMES, [0])):
        for row in table.values():
            for c in cols:
                words.update(row[c].split())
    words.discard("")
    return words


# =====================================================================================
# Non-speech sounds for audio captioning (task aac). Each caption is a function of the
# discrete parameters; the continuous ones (exact frequency, length, level) vary freely.
# =====================================================================================
PITCH_RANGES = {"low": (150.0, 300.0), "medium": (400.0, 800.0), "high": (1500.0, 3000.0)}  # Hz
TONE_LENGTHS = {"short": (0.6, 0.9), "long": (1.6, 2.4)}                                      # s
NOISE_LEVELS = {"loud": 0.7, "soft": 0.08}                                                    # peak
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
SOUND_KINDS = ["tone", "two_tones", "chirp", "beeps", "noise"]
BEEP_SECONDS = 0.12
NOISE_FLOOR = 0.002  # faint white noise under every sound, so no file is digital silence


def sample_sound(rng):
    """Parameters of one sound (a JSON-able dict): kind, the captioned choices, and the rest."""
    kind = rng.choice(SOUND_KINDS)
    p = {"kind": kind, "amp": round(rng.uniform(0.3, 0.7), 3), "seed": rng.randrange(2**31),
         "pad": [round(rng.uniform(0.15, 0.35), 3), round(rng.uniform(0.15, 0.35), 3)]}
    if kind == "tone":
        p["pitch"], p["length"] = rng.choice(list(PITCH_RANGES)), rng.choice(list(TONE_LENGTHS))
        p["f"] = round(rng.uniform(*PITCH_RANGES[p["pitch"]]), 1)
        p["dur"] = round(rng.uniform(*TONE_LENGTHS[p["length"]]), 3)
    elif kind == "two_tones":
        p["pitches"] = rng.sample(list(PITCH_RANGES), 2)
        p["fs"] = [round(rng.uniform(*PITCH_RANGES[c]), 1) for c in p["pitches"]]
        p["dur"] = round(rng.uniform(0.4, 0.6), 3)  # each tone; 0.1 s gap between them
    elif kind == "chirp":
        p["direction"] = rng.choice(["rising", "falling"])
        lo, hi = rng.uniform(200, 400), rng.uniform(2000, 4000)
        p["f0"], p["f1"] = (round(lo, 1), round(hi, 1)) if p["direction"] == "rising" else (round(hi, 1), round(lo, 1))
        p["dur"] = round(rng.uniform(0.6, 1.4), 3)
    elif kind == "beeps":
        p["count"], p["pitch"] = rng.choice(list(COUNT_WORDS)), rng.choice(list(PITCH_RANGES))
        p["f"] = round(rng.uniform(*PITCH_RANGES[p["pitch"]]), 1)
        p["gap"] = round(rng.uniform(0.12, 0.2), 3)
    else:
        p["level"] = rng.choice(list(NOISE_LEVELS))
        p["amp"] = NOISE_LEVELS[p["level"]]
        p["dur"] = round(rng.uniform(0.5, 1.2), 3)
    return p


def caption(p):
    """Caption from the discrete parameters of sample_sound()."""
    k = p["kind"]
    if k == "tone":
        return f"a {p['length']} {p['pitch']} pitched tone"
    if k == "two_tones":
        return f"a {p['pitches'][0]} tone followed by a {p['pitches'][1]} tone"
    if k == "chirp":
        return f"a {p['direction']} chirp"
    if k == "beeps":
        return f"{COUNT_WORDS[p['count']]} short {p['pitch']} pitched beeps"
    if k == "noise":
        return f"a {p['level']} burst of noise"
    raise ValueError(f"unknown sound kind {k!r}")


def _faded(x, fade=0.01):
    """Raised-cosine fade in/out (10 ms) so tones start and stop without clicks."""
    n = min(int(fade * SAMPLE_RATE), len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
    x[:n] *= ramp
    x[len(x) - n:] *= ramp[::-1]
    return x


def _tone(f, dur):
    t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
    return _faded(np.sin(2 * np.pi * f * t))


def _silence(dur):
    return np.zeros(int(dur * SAMPLE_RATE))


def render_sound(p):
    """Parameters -> float32 waveform at 16 kHz, peak about p["amp"], with padding and noise floor."""
    rng = np.random.default_rng(p["seed"])
    k = p["kind"]
    if k == "tone":
        x = _tone(p["f"], p["dur"])
    elif k == "two_tones":
        x = np.concatenate([_tone(p["fs"][0], p["dur"]), _silence(0.1), _tone(p["fs"][1], p["dur"])])
    elif k == "chirp":
        # exponential sweep: f(t) = f0 (f1/f0)^(t/T); phase = 2 pi f0 T (r^(t/T) - 1) / ln r
        T = p["dur"]
        t = np.arange(int(T * SAMPLE_RATE)) / SAMPLE_RATE
        r = p["f1"] / p["f0"]
        x = _faded(np.sin(2 * np.pi * p["f0"] * T * (r ** (t / T) - 1) / np.log(r)))
    elif k == "beeps":
        parts = []
        for i in range(p["count"]):
            parts += [_silence(p["gap"])] if i else []
            parts.append(_tone(p["f"], BEEP_SECONDS))
        x = np.concatenate(parts)
    elif k == "noise":
        x = _faded(rng.uniform(-1.0, 1.0, int(p["dur"] * SAMPLE_RATE)), fade=0.02)
    else:
        raise ValueError(f"unknown sound kind {k!r}")
    x = np.concatenate([_silence(p["pad"][0]), p["amp"] * x, _silence(p["pad"][1])])
    x += NOISE_FLOOR * rng.standard_normal(len(x))
    return x.astype(np.float32)


# =====================================================================================
# Speech: eSpeak NG. Two backends with the same voices and parameters:
#   "lib": libespeak-ng from the `espeakng-loader` wheel through ctypes (about 3 ms a sentence)
#   "cli": the `espeak-ng` program (Debian package espeak-ng), one process per sentence
# =====================================================================================
VOICES = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029", "en-gb-x-gbclan"]
VARIANTS = ["", "m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4"]  # "" = the voice's own

# speak_lib.h constants
AUDIO_OUTPUT_SYNCHRONOUS = 2   # like RETRIEVAL (callback gets the samples) but espeak_Synth blocks
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE, ESPEAK_PITCH = 1, 3
EE_OK = 0
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakLib:
    """libespeak-ng through ctypes. One per process: the library keeps global state.

    That state carries over from one utterance to the next (wavegen.c keeps a function-static
    pitch-flutter index and the wave phase, which no API call resets), so the same call gives
    slightly different audio depending on what was spoken before. To make every file a pure
    function of its own parameters -- whatever the worker count, order or resumed files --
    synth() forks: the child speaks from the state this process had right after
    __init__ and pipes the samples back (about 6 ms more per utterance). Without os.fork
    (Windows) it speaks in-process and audio is only reproducible for a fixed order.
    """
    name = "lib"

    def __init__(self, fork=True):
        import espeakng_loader  # pip install espeakng-loader: ships libespeak-ng and its data
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.libc = ctypes.CDLL(None)
        self.libc.srand.argtypes = [ctypes.c_uint]
        # path = the folder that holds espeak-ng-data (speak_lib.h); buflength 0 = 60 ms chunks
        data_parent = os.path.dirname(espeakng_loader.get_data_path())
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), ESPEAK_INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data in {data_parent}")
        self.lib, self.sample_rate, self._chunks = lib, rate, []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference, or ctypes frees it
        lib.espeak_SetSynthCallback(self._callback)
        self.version = "libespeak-ng " + lib.espeak_Info(None).decode()
        self._fork = fork and hasattr(os, "fork")
        # A fixed warm-up (the first utterance of a process loads tables), then never speak
        # here again: every child starts from this same state.
        self._speak("warm up", "en-us", 175, 50)

    def _collect(self, wav, n, events):
        if wav and n > 0:  # wav NULL = synthesis finished; n may be 0 mid-way
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on

    def _speak(self, text, voice, rate, pitch, seed=0):
        """Synthesise in this process -> int16 samples at self.sample_rate (22050 Hz)."""
        # Breathy variants (f2, ...) add noise from espeak's own generator and libc rand():
        # seed both, or the noise depends on whatever else ran in this process.
        self.lib.espeak_ng_SetRandSeed(seed)
        self.libc.srand(seed)
        if self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r} (see VOICES / VARIANTS in {__file__})")
        self.lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)  # after the voice: it resets them
        self.lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if err != EE_OK or not self._chunks:
            raise RuntimeError(f"espeak_Synth failed (error {err}) on {text!r} with voice {voice!r}")
        return np.concatenate(self._chunks)

    def synth(self, text, voice, rate, pitch, seed=0):
        """-> int16 samples at self.sample_rate, spoken from the post-__init__ state (see class doc)."""
        if not self._fork:
            return self._speak(text, voice, rate, pitch, seed)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak, send the samples, exit without running any Python cleanup
            code = 1
            try:
                os.close(r)
                data = self._speak(text, voice, rate, pitch, seed).tobytes()
                with os.fdopen(w, "wb") as f:
                    f.write(data)
                code = 0
            except BaseException as e:
                print(f"eSpeak NG child: {e!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()  # read before waiting: the samples may not fit in the pipe buffer
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"eSpeak NG failed on {text!r} with voice {voice!r} (child status {status})")
        return np.frombuffer(data, dtype=np.int16)


class EspeakCli:
    """The espeak-ng program: `espeak-ng -v VOICE -s RATE -p PITCH --stdout TEXT` -> WAV bytes."""
    name = "cli"

    def __init__(self):
        self.exe = shutil.which("espeak-ng")
        if self.exe is None:
            raise RuntimeError("no espeak-ng program on PATH (Debian: apt-get install espeak-ng)")
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
        self.version = out.stdout.strip().split("  Data at")[0]
        self.sample_rate = None  # read from each WAV header

    def synth(self, text, voice, rate, pitch, seed=0):
        """A fresh process per utterance, so no state carries over (seed: nothing to seed)."""
        cmd = [self.exe, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout", text]
        out = subprocess.run(cmd, capture_output=True)
        if out.returncode != 0 or len(out.stdout) <= 44:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace').strip()}")
        x, self.sample_rate = sf.read(io.BytesIO(out.stdout), dtype="int16")
        return x


_BACKEND = None  # this process's backend, made on first use


def get_backend(name="auto", fork=True):
    """The process-wide backend: "lib", "cli", or "auto" (lib when it initialises, else cli).
    fork=False makes the lib backend speak in-process (see EspeakLib)."""
    global _BACKEND
    if _BACKEND is not None and name in ("auto", _BACKEND.name):
        if _BACKEND.name == "lib":  # (a process that spoke in-process no longer has the pristine state)
            _BACKEND._fork = fork and hasattr(os, "fork")
        return _BACKEND
    if name not in ("auto", "lib", "cli"):
        raise ValueError(f"--backend must be auto, lib or cli, not {name!r}")
    errors = []
    for cls in [EspeakLib, EspeakCli]:
        if name in ("auto", cls.name):
            try:
                _BACKEND = cls(fork) if cls is EspeakLib else cls()
                return _BACKEND
            except (ImportError, OSError, RuntimeError) as e:
                errors.append(f"{cls.name}: {e}")
    raise RuntimeError("no eSpeak NG backend works: " + "; ".join(errors) +
                       "  (pip install espeakng-loader, or apt-get install espeak-ng)")


def synth_speech(job, backend):
    """One utterance -> float32 16 kHz: synthesise, resample 22050 -> 16000 (soxr), set the peak
    level, pad with silence and add the faint noise floor (a log-mel of exact zeros is -inf)."""
    v = job["voice"]
    name = v["voice"] + (f"+{v['variant']}" if v["variant"] else "")
    x = backend.synth(job["text"], name, v["rate"], v["pitch"], v["seed"]).astype(np.float32) / 32768.0
    x = soxr.resample(x, backend.sample_rate, SAMPLE_RATE)
    peak = float(np.abs(x).max())
    if peak < 1e-3:
        raise RuntimeError(f"eSpeak NG gave silence for {job['text']!r} with voice {name!r}")
    x *= 10 ** (v["gain_db"] / 20) / peak  # peak level drawn per utterance
    pad = [np.zeros(int(s * SAMPLE_RATE), np.float32) for s in v["pad"]]
    x = np.concatenate([pad[0], x, pad[1]])
    x += NOISE_FLOOR * np.random.default_rng(v["seed"]).standard_normal(len(x))  # no digital silence
    return x.astype(np.float32)


def sample_voice(rng, rate_range, pitch_range, voices):
    return {"voice": rng.choice(voices), "variant": rng.choice(VARIANTS),
            "rate": rng.randint(*rate_range), "pitch": rng.randint(*pitch_range),
            "gain_db": round(rng.uniform(-6.0, -1.0), 2), "seed": rng.randrange(2**31),
            "pad": [round(rng.uniform(0.05, 0.25), 3), round(rng.uniform(0.05, 0.25), 3)]}


# =====================================================================================
# Jobs: one audio file each. The file name carries a hash of everything that shapes the audio,
# so an existing file that decodes is exactly the one this run would write (resume = skip it).
# =====================================================================================
def job_hash(job):
    key = {k: job[k] for k in ("text", "voice", "backend", "sound") if k in job}
    key.update(version=FORMAT_VERSION, sr=SAMPLE_RATE)
    return hashlib.sha1(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:8]


def audio_ok(path):
    """True when path decodes fully as 16 kHz mono audio of at least 0.1 s."""
    try:
        info = sf.info(path)
        if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames < SAMPLE_RATE // 10:
            return False
        return len(sf.read(path, dtype="int16")[0]) == info.frames
    except (RuntimeError, sf.LibsndfileError, OSError):
        return False


def run_job(job):
    """Worker: make one file unless a valid one exists. -> (relative path, seconds, made?)."""
    path = os.path.join(job["root"], job["audio"])
    if audio_ok(path):
        return job["audio"], sf.info(path).frames / SAMPLE_RATE, False
    if "sound" in job:
        x = render_sound(job["sound"])
    else:
        x = synth_speech(job, get_backend(job["backend"], job["fork"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    sf.write(tmp, np.clip(x, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format=job["format"].upper())
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half file under the real name
    return job["audio"], len(x) / SAMPLE_RATE, True


def run_jobs(jobs, workers):
    """-> {relative path: seconds}, made count. workers > 1 uses a spawn pool (each worker
    initialises its own eSpeak; the library's state is per process)."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety
        def tqdm(it, **kw):
            return it
    seconds, made = {}, 0
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.imap_unordered(run_job, jobs, chunksize=16)
            for rel, sec, new in tqdm(results, total=len(jobs), desc="audio", disable=None):
                seconds[rel], made = sec, made + new
    else:
        for job in tqdm(jobs, desc="audio", disable=None):
            rel, sec, new = run_job(job)
            seconds[rel], made = sec, made + new
    return seconds, made


# =====================================================================================
# Manifests
# =====================================================================================
def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path, entries):
    write_atomic(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return len(entries)


def plan(args, backend="lib"):
    """Everything the corpus holds, without audio: utterances per split and sounds.
    backend ("lib" or "cli": their eSpeak versions differ) goes into the speech file hashes."""
    splits = make_splits(args.n_train, args.n_dev, args.n_test, args.seed, args.n_retrieval)
    vrng = random.Random(f"voices-{args.seed}")
    utts = {}
    for split in SPEECH_SPLITS:  # retrieval last: its voices leave those of the other splits as they were
        utts[split] = []
        for i, (en, zh, ja) in enumerate(splits[split]):
            job = {"id": f"{split}-{i:05d}", "text": en, "zh": zh, "ja": ja, "backend": backend,
                   "voice": sample_voice(vrng, args.rate, args.pitch, args.voices)}
            job["audio"] = f"audio/{split}/{job['id']}-{job_hash(job)}.{args.format}"
            utts[split].append(job)
    srng = random.Random(f"sounds-{args.seed}")
    for split, n in [("aac", args.n_aac), ("aac_dev", args.n_aac_dev)]:
        utts[split] = []
        for i in range(n):
            job = {"id": f"{split}-{i:05d}", "sound": sample_sound(srng)}
            job["caption"] = caption(job["sound"])
            job["audio"] = f"audio/{split}/{job['id']}-{job_hash(job)}.{args.format}"
            utts[split].append(job)
    return utts


def manifests(utts, seed):
    """{file name: entries} in the manifest format of the README (id, audio, task, text[, translation, tgt_lang])."""
    def asr(u):
        return {"id": u["id"], "audio": u["audio"], "task": "asr", "text": u["text"]}

    def st(u, lang):
        return {"id": f"{u['id']}-{lang}", "audio": u["audio"], "task": "st", "text": u["text"],
                "translation": u[lang], "tgt_lang": lang}

    def aac(u):
        return {"id": u["id"], "audio": u["audio"], "task": "aac", "text": u["caption"]}

    out = {"asr_train.jsonl": [asr(u) for u in utts["train"]],
           "asr_dev.jsonl": [asr(u) for u in utts["dev"]],
           "aac_train.jsonl": [aac(u) for u in utts["aac"]],
           "aac_dev.jsonl": [aac(u) for u in utts["aac_dev"]]}
    stage1 = out["asr_train.jsonl"] + out["aac_train.jsonl"]
    random.Random(f"stage1-{seed}").shuffle(stage1)
    out["stage1_train.jsonl"] = stage1
    for split in ["train", "dev", "test"]:
        for lang in ["zh", "ja"]:
            out[f"st_{lang}_{split}.jsonl"] = [st(u, lang) for u in utts[split]]
    if utts["retrieval"]:
        out["retrieval.jsonl"] = [asr(u) for u in utts["retrieval"]]
    return out


def build(args):
    """Build (or finish) the corpus in args.out; returns the corpus.json summary."""
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    backend = get_backend(args.backend, not args.no_fork)  # in this process too: fail early, and name it in corpus.json
    utts = plan(args, backend.name)
    jobs = []
    for split, items in utts.items():
        for u in items:
            job = {k: u[k] for k in ("text", "voice", "sound", "audio") if k in u}
            jobs.append(dict(job, root=args.out, format=args.format, backend=backend.name, fork=not args.no_fork))
    t1 = time.time()
    seconds, made = run_jobs(jobs, args.workers)
    t_audio = time.time() - t1

    counts = {}
    for name, entries in manifests(utts, args.seed).items():
        counts[name] = write_jsonl(os.path.join(args.out, name), entries)
    train = utts["train"]
    captions = sorted({u["caption"] for u in utts["aac"]})
    lines = [u["text"] for u in train] + [u["zh"] for u in train] + [u["ja"] for u in train] + captions
    write_atomic(os.path.join(args.out, "text.txt"), "\n".join(lines) + "\n")
    write_jsonl(os.path.join(args.out, "meta.jsonl"),
                [{"id": u["id"], "audio": u["audio"], **u["voice"], "seconds": round(seconds[u["audio"]], 3)}
                 for s in SPEECH_SPLITS for u in utts[s]])
    summary = {
        "seed": args.seed, "sample_rate": SAMPLE_RATE, "format": args.format,
        "backend": backend.version,
        "utterances": {s: len(utts[s]) for s in utts},
        "seconds": {s: round(sum(seconds[u["audio"]] for u in utts[s]), 1) for s in utts},
        "manifests": counts,
        "vocab": {"lexicon_en_words": len(lexicon_words()),
                  "train_en_words": len({w for u in train for w in u["text"].split()}),
                  "train_zh_chars": len({c for u in train for c in u["zh"]}),
                  "train_ja_chars": len({c for u in train for c in u["ja"]}),
                  "captions": len(captions)},
        "voices": args.voices, "variants": VARIANTS, "rate": args.rate, "pitch": args.pitch,
    }
    write_atomic(os.path.join(args.out, "corpus.json"), json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(jobs)} audio files ({made} made, {len(jobs) - made} already there) in {t_audio:.1f} s "
          f"with {args.workers} worker(s); total {time.time() - t0:.1f} s -> {args.out}", file=sys.stderr)
    return summary


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out/corpus", help="output folder (manifests at its root)")
    p.add_argument("--seed", type=int, default=0, help="sentences, voices and sounds all follow from it")
    p.add_argument("--n-train", type=int, default=3000, help="training utterances")
    p.add_argument("--n-dev", type=int, default=100, help="dev utterances (distinct from train)")
    p.add_argument("--n-test", type=int, default=1000, help="test utterances (distinct from train and dev)")
    p.add_argument("--n-aac", type=int, default=300, help="captioned sounds for stage 1 training")
    p.add_argument("--n-aac-dev", type=int, default=30, help="captioned sounds for validation")
    p.add_argument("--n-retrieval", type=int, default=500,
                   help="utterances of the stage-2 retrieval manifest, in no other split (0: no manifest)")
    p.add_argument("--format", choices=["flac", "wav"], default="flac", help="audio files, 16 kHz mono 16-bit")
    p.add_argument("--backend", choices=["auto", "lib", "cli"], default="auto",
                   help="lib = libespeak-ng from the espeakng-loader wheel, cli = the espeak-ng program")
    p.add_argument("--no-fork", action="store_true",
                   help="lib backend: speak in-process instead of one fork per utterance; about 2x "
                        "faster, but the audio then depends on worker count and order (see EspeakLib)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes that make audio (1 = this process)")
    p.add_argument("--voices", nargs="+", default=VOICES, help="eSpeak NG voices to draw from")
    p.add_argument("--rate", type=int, nargs=2, default=[140, 200], metavar=("MIN", "MAX"),
                   help="speaking rate range, words per minute")
    p.add_argument("--pitch", type=int, nargs=2, default=[30, 70], metavar=("MIN", "MAX"),
                   help="base pitch range (eSpeak 0-100, 50 = normal)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    for flag in ("n_train", "n_dev", "n_test", "n_retrieval", "n_aac", "n_aac_dev"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    if args.n_test + args.n_dev + args.n_train + args.n_retrieval == 0:
        raise SystemExit("--n-train, --n-dev, --n-test and --n-retrieval are all 0: nothing to build")
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    for flag, (lo, hi) in (("--rate", args.rate), ("--pitch", args.pitch)):
        if lo > hi:
            raise SystemExit(f"{flag} MIN MAX: {lo} > {hi}")
    return build(args)


if __name__ == "__main__":
    main()
