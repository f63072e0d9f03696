"""Evaluate a trained AI-STA model: SacreBLEU (BLEU and chrF) on speech translation (ST) and on zero-shot text
translation (MT), paired bootstrap against a baseline, the alignment degree of speech and text states, the t-SNE
picture of the embedding layer, and the paper's tables and figures over runs and seeds.

The paper's measurements (CoVoST 2 test manifests from prepare_data.py, checkpoints from the stage scripts):

    Table 2, 3, 4 (ST BLEU)   python evaluate.py --ckpt runs/stage3/best.safetensors --manifest covost/test.en_zh.jsonl
    Table 5 (ST and MT BLEU)  python evaluate.py --ckpt ... --manifest ... --mode st mt
    significance vs base      python evaluate.py --ckpt ... --manifest ... --baseline-hyps runs/base/eval/test.en_zh
    Figure 6 (alignment)      python evaluate.py --ckpt ... --manifest ... --alignment 0 1 --num-pairs 1000
    Figure 5 (t-SNE)          python evaluate.py --ckpt ... --manifest ... --tsne fig5.png --tsne-base BASE_CKPT
    one table, several runs   python evaluate.py --table base*/eval/test/metrics.json sta*/eval/test/metrics.json
    Figure 6 from the runs    python evaluate.py --table ... --fig6 fig6.png
    Figure 4 as a table       python evaluate.py --mrr runs/stage2/layers.json
    score a hypotheses file   python evaluate.py --hyps hyps.st.jsonl [--baseline base.st.jsonl] [--tgt-lang zh]
    translate a few files     python evaluate.py --ckpt ... --audio a.wav b.flac --tgt-lang ja
    on 8 GPUs                 torchrun --nproc_per_node 8 evaluate.py --ckpt ... --manifest ...

BLEU: SacreBLEU corpus BLEU (one reference, case-sensitive) with the tokenizer of the target language:
zh -> "zh" (characters for CJK; 13a on Chinese gives near-zero BLEU), ja -> "ja-mecab" (needs
`pip install "sacrebleu[ja]"`: mecab-python3 + ipadic), any other -> "13a"; printed with its signature.
chrF: SacreBLEU's CHRF with its defaults (chrF2: character 6-grams, beta 2, no tokenizer), next to every BLEU.
Paired bootstrap (--baseline with --hyps, --baseline-hyps with --manifest): SacreBLEU's own test
(sacrebleu.significance.PairedTest, 1000 resamples, seed 12345), the numbers of
`sacrebleu REF -i BASE SYS --paired-bs -m bleu chrf -tok TOK`: per metric the bootstrap mean and 95% half-width
of the system and the p-value of its difference to the baseline; both files must hold the same segments.
--table: runs with the same --name are seeds of one system (mean ± sample sd, the number of seeds); the first
system is the baseline: a p-value is shown for each seed whose paired bootstrap was computed against the first
system's run of the same training seed (recognised by the SHA-256 of its hypotheses, recorded in metrics.json).
MT mode (the paper's Table 5) puts the transcript's token embeddings where the speech tokens go, with the same
template and instruction as ST (the paper: "the inference prompt is identical to the training prompt"); no audio
is read.

Alignment degree (paper section 6.5, Figure 6). For N test pairs (speech_i, transcript_i), sampled with --seed,
the speech goes through the LSM as in training and the transcript goes in its place (same template and
instruction, model.text_forward). At layer l, with h^s the states at the speech windows that overlap real audio
(--align-positions all: every speech position the LLM saw) and h^t the states at the transcript's tokens:

    A_l = 1/N sum_i log W(h^s_{i,l}, h^t_{i,l}),    W = ot.wasserstein (entropic estimate of eq. 1; --ot-cost)

and the reported degree is the mean of A_l over the given layers (the paper uses its selected layers, 0 and 1).
Lower = better aligned. For scale, the same mean over mismatched pairs (speech_i with the transcript of
another utterance of its batch) is reported too: the level of "no alignment" for this model and layer.

Figure 5: speech (layer 0 = projector output, at the --align-positions windows) and text (layer 0 = token
embeddings) states, each averaged over its length, for the same N pairs; t-SNE to 2-D (scikit-learn) and a
kernel-density contour per modality (scipy), saved as PNG (matplotlib). With --tsne-base, two panels (the base
model, then --ckpt) on the same pairs, with the same t-SNE settings and the same axes. These three libraries are
optional: only --tsne and --fig6 need them. Figure 6 (--fig6, from metrics.json files): ST BLEU against the
alignment degree, one labelled point per system (mean ± sd over its seeds).

Sharding: the manifest is cut into batches of --batch-size consecutive entries, the same for any number of
processes, and under torchrun every rank decodes a contiguous run of those batches (so hypotheses do not depend on
the number of processes). Each rank appends its hypotheses, batch by batch as they are decoded, to its own file
<output-dir>/partial/hyps.<mode>.rank<r>.jsonl (flushed; a line cut by a kill is ignored), and rank 0 merges
the files in manifest order once every entry is there. No collective waits for the slowest rank's decoding
(ranks are compared through the files, which must be on a filesystem all ranks see), so ranks that differ by
more than --dist-timeout still finish; every rank waits for the files, then all leave the process group together
(runtime.close_distributed). A killed or failed evaluation run again with the same settings decodes
only the batches that are missing (with other settings the partial files are discarded, as it says); the
partial folder is removed when metrics.json is written. --skip-bad leaves out entries whose audio cannot be
read (listed under "skipped" in metrics.json, BLEU over the rest, said on stderr). CPU: gloo; GPU: nccl.

Outputs of rank 0 in --output-dir: hyps.st.jsonl / hyps.mt.jsonl (manifest order; id, src, reference,
hypothesis, tgt_lang), metrics.json (BLEU and chrF with signatures per mode and language, the paired bootstrap,
alignment, skipped entries, the training run's seed from its args.json, arguments; strict JSON: a non-finite
number is written as null); on stdout the score lines and a summary table in the form of the paper's tables
(Markdown).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import ot
import runtime

TOKENIZE_BY_LANG = {"zh": "zh", "ja": "ja-mecab"}  # every other target language: "13a"
DEFAULT_TOKENIZE = "13a"
OWN_FILES = ("hyps.st.jsonl", "hyps.mt.jsonl", "metrics.json")  # written atomically into --output-dir
JA_INSTALL = 'pip install "sacrebleu[ja]"'
FIG_INCHES, FIG_DPI = (6.0, 5.0), 100  # --tsne: a 600 x 500 pixel PNG per panel
FIG6_INCHES = (7.5, 6.0)  # the legend sits below the axes


class EvalError(Exception):
    """Bad input or a missing optional dependency; the command line prints the message without a traceback."""


def log(*args):
    """Progress and notes go to stderr: stdout carries results only (scores, table, --audio translations)."""
    print(*args, file=sys.stderr, flush=True)

# ----------------------------------------------------------------------------- BLEU


def lang_code(code):
    """'zh-CN' -> 'zh', 'ja_JP' -> 'ja', 'DE' -> 'de' (only the language decides the tokenizer)."""
    return str(code).strip().replace("_", "-").split("-")[0].lower()


def bleu_tokenizer(tgt_lang, override=None):
    """SacreBLEU tokenizer for a target language: zh -> zh, ja -> ja-mecab, else 13a; `override` wins."""
    return override or TOKENIZE_BY_LANG.get(lang_code(tgt_lang), DEFAULT_TOKENIZE)


def check_tokenizer(tokenize):
    """Fail before any decoding when SacreBLEU cannot run `tokenize` (ja-mecab needs MeCab and the IPA dictionary)."""
    from sacrebleu.metrics import BLEU
    if tokenize.startswith("ja-mecab"):
        try:
            import ipadic  # noqa: F401
            import MeCab  # noqa: F401
        except ImportError as e:
            raise EvalError(f"Japanese BLEU uses SacreBLEU's ja-mecab tokenizer, which needs MeCab and the IPA "
                            f"dictionary ({e}): {JA_INSTALL}") from None
    try:
        BLEU(tokenize=tokenize)
    except Exception as e:  # unknown name, or MeCab with the wrong dictionary (an installed unidic-lite can win)
        raise EvalError(f"SacreBLEU tokenizer {tokenize!r} does not work here: {str(e).strip()}"
                        + (f" (Japanese: {JA_INSTALL}, and no other MeCab dictionary)" if "ja" in tokenize else ""))


def corpus_bleu(hyps, refs, tokenize):
    """SacreBLEU corpus BLEU, one reference per segment -> (BLEUScore, signature string)."""
    from sacrebleu.metrics import BLEU
    bleu = BLEU(tokenize=tokenize)
    return bleu.corpus_score(list(hyps), [list(refs)]), str(bleu.get_signature())


def corpus_chrf(hyps, refs):
    """SacreBLEU corpus chrF with its defaults (chrF2: character 6-grams, no word n-grams, beta 2, whitespace
    ignored; no tokenizer, so the same for every language) -> (CHRFScore, signature string)."""
    from sacrebleu.metrics import CHRF
    chrf = CHRF()
    return chrf.corpus_score(list(hyps), [list(refs)]), str(chrf.get_signature())


def hyps_digest(hyps):
    """SHA-256 of a list of hypotheses: recorded with every score so that --table can tell which run a paired
    bootstrap was computed against (the baseline's hypotheses), wherever the files have moved since."""
    return hashlib.sha256("\n".join(hyps).encode("utf-8")).hexdigest()


def score_records(records, tokenize=None):
    """Records with reference, hypothesis, tgt_lang -> {lang: dict(score, signature, chrf, chrf_signature, n,
    line, chrf_line, sha256)}: corpus BLEU and chrF per target language (languages in order of first appearance);
    sha256 = hyps_digest of the language's hypotheses."""
    out = {}
    for lang, rs in by_language(records).items():
        hyps, refs = [r["hypothesis"] for r in rs], [r["reference"] for r in rs]
        bleu, sig = corpus_bleu(hyps, refs, bleu_tokenizer(lang, tokenize))
        chrf, chrf_sig = corpus_chrf(hyps, refs)
        out[lang] = dict(score=bleu.score, signature=sig, chrf=chrf.score, chrf_signature=chrf_sig, n=len(rs),
                         line=str(bleu), chrf_line=str(chrf), sha256=hyps_digest(hyps))
    return out


def by_language(records):
    """Records -> {lang: records of that target language, in order} (languages in order of first appearance)."""
    out = {}
    for r in records:
        out.setdefault(lang_code(r["tgt_lang"]), []).append(r)
    return out


def paired_bootstrap(hyps, baseline, refs, tokenize):
    """Paired bootstrap resampling (Koehn 2004) of BLEU and chrF, system `hyps` against `baseline` on the same
    references, with SacreBLEU's own implementation and defaults -- what `sacrebleu REF -i BASE SYS --paired-bs
    -m bleu chrf -tok TOK` computes: sacrebleu.significance.PairedTest(test_type="bs"), 1000 resamples of the
    segments (the same resamples for both systems), seed 12345 (or the SACREBLEU_SEED environment variable, as
    for the command line). For each metric:
        mean, ci  the mean of the system's 1000 resampled scores and half the width of their central 95% range;
        p         (1 + #{resamples whose |sys - base| minus its mean exceeds the real |sys - base|}) / 1001,
                  two-sided: the probability of a difference this large if both systems were the same process.
    -> dict(bleu=dict(score, mean, ci, p), chrf=dict(...), baseline=dict(bleu=dict(score, mean, ci), chrf=...),
    signature=.., chrf_signature=.. (SacreBLEU's, with bs and seed), n (segments), n_samples, seed, identical
    (the two systems' hypotheses are the same))."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest
    refs = [list(refs)]
    metrics = {"bleu": BLEU(tokenize=tokenize, references=refs), "chrf": CHRF(references=refs)}
    test = PairedTest([("baseline", list(baseline)), ("system", list(hyps))], metrics, references=None,
                      test_type="bs", n_samples=1000)
    sigs, scores = test()
    # identical systems: SacreBLEU's p is then its floor 1 / 1001 ("significant"; its count of resampled
    # differences above the real one is 0 when both are 0), so say it: --table shows "same", not that p
    out = dict(baseline={}, n=len(hyps), n_samples=test.n_samples, seed=test._seed,
               identical=list(hyps) == list(baseline))
    for key, name in zip(metrics, [k for k in scores if k != "System"]):  # "BLEU", "chrF2", in metrics' order
        base, sys_ = scores[name]
        out[key] = dict(score=float(sys_.score), mean=float(sys_.mean), ci=float(sys_.ci), p=float(sys_.p_value))
        out["baseline"][key] = dict(score=float(base.score), mean=float(base.mean), ci=float(base.ci))
        out["signature" if key == "bleu" else "chrf_signature"] = sigs[name].format()
    return out


def check_paired(records, baseline, what="hypotheses", base_what="--baseline"):
    """Paired tests compare two systems on the same segments: the same references (and ids, where both files have
    them) in the same order. Else an EvalError naming the first place where they differ."""
    for k, (a, b) in enumerate(zip(records, baseline)):
        wa, wb = a.get("where", f"{what}: segment {k + 1}"), b.get("where", f"{base_what}: segment {k + 1}")
        if a.get("id") is not None and b.get("id") is not None and a["id"] != b["id"]:
            raise EvalError(f"{wa} has id {a['id']!r} but {wb} has id {b['id']!r}: a paired test needs the same "
                            f"segments in the same order")
        if lang_code(a["tgt_lang"]) != lang_code(b["tgt_lang"]):
            raise EvalError(f"{wa} has target language {a['tgt_lang']!r} but {wb} has {b['tgt_lang']!r}: a paired "
                            f"test needs the same segments in the same order")
        if a["reference"] != b["reference"]:
            raise EvalError(f"{wa} and {wb} have different references ({a['reference']!r} vs {b['reference']!r}): "
                            f"a paired test needs the same references in the same order")
    if len(records) != len(baseline):
        raise EvalError(f"{what} has {len(records)} segments but {base_what} has {len(baseline)} (the first "
                        f"{min(len(records), len(baseline))} agree): a paired test needs the same segments")


def add_paired(scores, records, baseline, tokenize=None, source=None, whole_baseline=None):
    """scores (score_records of `records`) += a paired bootstrap against the `baseline` records of the same
    segments, per language: scores[lang]["paired_bs"] = paired_bootstrap(...) + `source` (the baseline's file)
    and the sha256 of the baseline run's hypotheses (all of them: `whole_baseline` when `baseline` is the part
    that both runs have), which --table matches with the baseline run's own metrics."""
    base, whole = by_language(baseline), by_language(whole_baseline or baseline)
    for lang, rs in by_language(records).items():
        bs = base.get(lang, [])
        out = paired_bootstrap([r["hypothesis"] for r in rs], [r["hypothesis"] for r in bs],
                               [r["reference"] for r in rs], bleu_tokenizer(lang, tokenize))
        scores[lang]["paired_bs"] = dict(out, baseline_sha256=hyps_digest([r["hypothesis"] for r in whole[lang]]),
                                         baseline_hyps=source)
    return scores


def common_segments(records, baseline, what, base_what):
    """The segments both runs have, for a paired test in a manifest evaluation: all of them, checked as
    check_paired, when the two lists have the same length; when one run skipped segments (--skip-bad: unreadable
    audio), the segments whose ids both have, in order, each with the same reference and language in both.
    -> (records, baseline) restricted to the common segments."""
    if len(records) == len(baseline) or not all(r.get("id") is not None for r in [*records, *baseline]):
        check_paired(records, baseline, what, base_what)
        return records, baseline
    base = {r["id"]: (k, r) for k, r in enumerate(baseline)}
    common, last = [], -1
    for r in records:
        if r["id"] not in base:
            continue
        k, b = base[r["id"]]
        if k < last:
            raise EvalError(f"{b['where']}: id {r['id']!r} is out of the order of {what}: a paired test needs the "
                            f"same segments in the same order")
        check_paired([r], [b], what, base_what)
        common.append((r, b))
        last = k
    if not common:
        raise EvalError(f"{what} and {base_what} have no segment id in common: nothing to compare")
    log(f"paired test on the {len(common)} segments that both {what} ({len(records)}) and {base_what} "
        f"({len(baseline)}) have")
    return [r for r, _ in common], [b for _, b in common]


def read_baselines(args, entries):
    """--baseline-hyps DIR_OR_FILE -> {mode: (file, the baseline's records)}, checked against the manifest entries
    before any decoding. DIR: the baseline's evaluation folder, hyps.<mode>.jsonl for every --mode; FILE: the one
    --mode's hypotheses."""
    if not args.baseline_hyps:
        return {}
    modes = [m for m in args.mode if m != "none"]
    if os.path.isdir(args.baseline_hyps):
        paths = {m: os.path.join(args.baseline_hyps, f"hyps.{m}.jsonl") for m in modes}
    elif len(modes) == 1:
        paths = {modes[0]: args.baseline_hyps}
    else:
        raise EvalError(f"--baseline-hyps {args.baseline_hyps}: a file holds one mode's hypotheses; for --mode "
                        f"{' '.join(modes)} give the baseline's evaluation folder (hyps.st.jsonl, hyps.mt.jsonl)")
    expected = [dict(id=e["id"], reference=e["translation"], tgt_lang=e["tgt_lang"], where=e["where"])
                for e in entries]
    out = {}
    for mode, path in paths.items():
        if not os.path.isfile(path):
            raise EvalError(f"--baseline-hyps {args.baseline_hyps}: {path} not found (the baseline's hypotheses "
                            f"for --mode {mode}, as evaluate.py writes them)")
        out[mode] = (path, read_hyps(path, one_language=False))
        common_segments(expected, out[mode][1], args.manifest, path)
    return out


def score_report(label, s, skipped=0):
    """The printed lines of one score_records entry (BLEU, chrF, signatures, paired bootstrap if any); `skipped`:
    entries left out (--skip-bad), said beside the segment count."""
    count = f"{s['n']} segments" + (f", {skipped} skipped" if skipped else "")
    lines = [f"{label} ({count}): {s['line']}", f"    signature: {s['signature']}"]
    if "chrf" in s:
        lines += [f"{label} ({count}): {s['chrf_line']}", f"    signature: {s['chrf_signature']}"]
    if "paired_bs" in s:
        bs = s["paired_bs"]
        for key, name in (("bleu", "BLEU"), ("chrf", "chrF2")):
            b, x = bs["baseline"][key], bs[key]
            lines.append(f"    paired bootstrap {name} ({bs['n_samples']} resamples, seed {bs['seed']}): system "
                         f"{x['score']:.2f} ({x['mean']:.2f} ± {x['ci']:.2f}), baseline {b['score']:.2f} "
                         f"({b['mean']:.2f} ± {b['ci']:.2f}), p = {x['p']:.4f}")
        lines.append(f"    against {bs.get('baseline_hyps') or 'the baseline'}"
                     + (": the same hypotheses (SacreBLEU's p is then 1/1001; there is no difference)"
                        if bs.get("identical") else ""))
    return "\n".join(lines)


def training_run(ckpt):
    """What --table needs to know of the run that wrote `ckpt`: its seed and alignment, from the args.json that
    train.py writes next to the checkpoints (None where there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "args.json")
    try:
        with open(path, encoding="utf-8") as f:
            a = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(a, dict):
        return None
    return dict(args=path, seed=a.get("seed"), align=a.get("align"), layers=a.get("layers"),
                layers_from=a.get("layers_from"))


def read_hyps(path, tgt_lang=None, one_language=True):
    """A hypotheses file (JSON lines with 'reference', 'hypothesis' and 'tgt_lang', or --tgt-lang for lines without
    one) -> list of records, each with 'where' (file and line). Errors name the file and line. With one_language
    (--hyps: one BLEU) every line must have the same target language."""
    records, first = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise EvalError(f"{where}: expected a JSON object")
            for key in ("reference", "hypothesis"):
                if not isinstance(rec.get(key), str):
                    raise EvalError(f"{where}: {key!r} must be a string, got {rec.get(key)!r}")
            lang = rec.get("tgt_lang") or tgt_lang
            if not lang:
                raise EvalError(f"{where}: no 'tgt_lang' in the line and no --tgt-lang given")
            if first is None:
                first = (lang_code(lang), n)
            elif one_language and lang_code(lang) != first[0]:
                raise EvalError(f"{where}: tgt_lang {lang!r} differs from {first[0]!r} on line {first[1]}; "
                                f"score one target language per file")
            records.append(dict(rec, tgt_lang=lang, where=where))
    if not records:
        raise EvalError(f"{path}: no hypotheses")
    return records


def score_hyps_file(args):
    """--hyps [--baseline]: score a file without any model. The last line of stdout is JSON: {"bleu", "chrf",
    "signature", "chrf_signature"} and, with --baseline, "paired_bs": {"bleu": {"mean", "ci", "p"}, "chrf": ...}."""
    records = read_hyps(args.hyps, args.tgt_lang)
    tokenize = bleu_tokenizer(records[0]["tgt_lang"], args.tokenize)
    check_tokenizer(tokenize)
    (lang, s), = score_records(records, args.tokenize).items()
    result = {"bleu": s["score"], "chrf": s["chrf"], "signature": s["signature"], "chrf_signature": s["chrf_signature"]}
    if args.baseline:
        baseline = read_hyps(args.baseline, args.tgt_lang)
        check_paired(records, baseline, args.hyps, args.baseline)
        add_paired({lang: s}, records, baseline, args.tokenize, source=args.baseline)
        result["paired_bs"] = {k: {x: s["paired_bs"][k][x] for x in ("mean", "ci", "p")} for k in ("bleu", "chrf")}
    print(score_report(f"{args.hyps}, target {lang}", s))
    print(json.dumps(result, ensure_ascii=False))
    return s

# ----------------------------------------------------------------------------- ranks


def shard(n, rank, world):
    """Contiguous slice of range(n) for `rank`; slices differ in size by at most 1 and cover range(n) in rank order."""
    return list(range(rank * n // world, (rank + 1) * n // world))


def gather(local, world):
    """Each rank's list -> the concatenation of all of them in rank order (on every rank)."""
    return [x for part in runtime.all_gather_objects(list(local), world) for x in part]

# ----------------------------------------------------------------------------- model and batches


def load_model(args, device, verbose):
    """LSM.from_trainable(--ckpt): base checkpoints from CKPT.json unless --whisper/--beats/--llm/--llm-dtype say."""
    from model import LSM  # imported here: --hyps and --table need no torch model stack (transformers, peft)
    check_ckpt(args)
    overrides = {k: getattr(args, k) for k in ("whisper", "beats", "llm", "llm_dtype") if getattr(args, k) is not None}
    lsm = LSM.from_trainable(args.ckpt, verbose=verbose, **overrides)
    return lsm.to(device).eval()


def check_ckpt(args):
    if not os.path.isfile(args.ckpt) or not os.path.isfile(args.ckpt + ".json"):
        raise EvalError(f"--ckpt {args.ckpt}: expected the trainable weights there and their build arguments in "
                        f"{args.ckpt}.json (both written by LSM.save_trainable)")


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def autocast(lsm, dtype=None):
    """The precision of the forwards, as training's --dtype: autocast in `dtype` (--dtype; None: the LLM's dtype, so
    a bf16 LLM is evaluated as the default --dtype bfloat16 trained it) on any device; float32: no autocast.
    BEATs' fbank stays in float32 under any autocast (beats.BEATs.preprocess): float16 would overflow there."""
    dtype = AUTOCAST_DTYPES[dtype] if dtype else lsm.llm.get_input_embeddings().weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(lsm.device.type, dtype=dtype)
    return contextlib.nullcontext()


def speech_batches(lsm, entries, indices, batch_size, instructions, num_workers, skip_bad=False):
    """Collated speech batches (data.py) of entries[indices], in that order. The dataset holds all entries so the
    instruction of item i is keyed by its manifest index, the same on every rank. Audio is cut at the Whisper
    checkpoint's window (data.window_seconds); with skip_bad an unreadable clip is dropped from its batch and
    listed in batch["skipped"]."""
    from torch.utils.data import DataLoader, Subset
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"])
    ds = Subset(data.SpeechDataset(entries, instructions, skip_bad=skip_bad, max_seconds=data.window_seconds(fe)),
                indices)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=data.Collator(fe))


def text_batches(entries, indices, batch_size, instructions):
    """Transcript-only batches for --mode mt: the fields model.generate(mode="mt") reads, and no audio."""
    for k in range(0, len(indices), batch_size):
        es = [(i, entries[i]) for i in indices[k:k + batch_size]]
        yield dict(ids=[e["id"] for _, e in es], transcripts=[e["text"] for _, e in es],
                   instructions=[instructions("st", e["tgt_lang"], key=i) for i, e in es],
                   targets=[e["translation"] for _, e in es], tasks=["st"] * len(es),
                   tgt_langs=[e["tgt_lang"] for _, e in es])


def manifest_batches(n, batch_size):
    """The batches of a manifest of n entries: consecutive runs of batch_size indices (any number of processes)."""
    return [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]


PARTIAL = "partial"


def partial_path(out_dir, mode, rank):
    return os.path.join(out_dir, PARTIAL, f"hyps.{mode}.rank{rank}.jsonl")


def read_partial(out_dir, mode):
    """{manifest index: record} from every rank's partial file of `mode` (any earlier number of processes too);
    lines that are not whole JSON records (the last line of a killed writer) are ignored, and a hypothesis wins
    over a "skipped" record of the same entry."""
    folder, done = os.path.join(out_dir, PARTIAL), {}
    prefix = f"hyps.{mode}.rank"
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not (name.startswith(prefix) and name.endswith(".jsonl")):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("index"), int):
                    if rec["index"] not in done or "skipped" in done[rec["index"]]:  # a hypothesis wins
                        done[rec["index"]] = rec
    return done


class PartialWriter:
    """Appends this rank's records, one batch per write, flushed and fsync'ed, to its partial file. A line cut
    short by an earlier kill is removed first, so the next record starts on a line of its own."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb") as f:
                content = f.read()
            if content and not content.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(content.rfind(b"\n") + 1)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records):
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def decoding_config(args, entries):
    """What the hypotheses depend on: partial results are reused only if it is unchanged (--skip-bad is not part
    of it: a hypothesis does not depend on it; without it, entries an earlier run skipped are decoded again)."""
    def stamp(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, int(st.st_mtime)]
    return dict(ckpt=stamp(args.ckpt), manifest=stamp(args.manifest), n=len(entries), num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, instructions=args.instructions,
                limit=args.limit, dtype=args.dtype,
                backbones={k: getattr(args, k) for k in ("whisper", "beats", "llm", "llm_dtype")})


def prepare_partial(out_dir, config, rank, world):
    """Rank 0 keeps the partial results of an earlier run with the same decoding config, or discards them (saying
    so); then every rank starts (one barrier, before any model is loaded)."""
    folder = os.path.join(out_dir, PARTIAL)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        cfg_path = os.path.join(folder, "config.json")
        old = None
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    old = json.load(f)
            except json.JSONDecodeError:
                old = None
        if old != config:
            stale = [n for n in os.listdir(folder) if n.endswith(".jsonl")]
            if stale:
                log(f"{folder}: partial hypotheses of an evaluation with other settings: discarded "
                    f"({len(stale)} files)")
            for n in stale:
                os.remove(os.path.join(folder, n))
            tmp = f"{cfg_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(config, f)
            os.replace(tmp, cfg_path)
        else:
            n_done = {m: len(read_partial(out_dir, m)) for m in ("st", "mt")}
            if any(n_done.values()):
                log(f"resuming the evaluation in {out_dir}: " + ", ".join(f"{m} {k} entries already decoded"
                                                                       for m, k in n_done.items() if k))
    if world > 1:
        dist.barrier()


@torch.no_grad()
def decode(lsm, entries, mode, args, rank, world, out_dir=None):
    """Translate this rank's run of the manifest's batches (manifest_batches). With out_dir, each batch's records
    are appended to this rank's partial file as soon as it is decoded, and batches already there (from an earlier,
    killed run) are not decoded again; returns nothing (read the merged result with wait_for_partial). Without
    out_dir (--audio): gather -> records (manifest order) on every rank. A record is {index, id, src, reference,
    hypothesis, tgt_lang}, or {index, id, skipped: reason} for an entry whose audio could not be read (--skip-bad)."""
    batches = manifest_batches(len(entries), args.batch_size)
    mine = [batches[j] for j in shard(len(batches), rank, world)]
    writer = None
    if out_dir is not None:
        done = read_partial(out_dir, mode)
        if not args.skip_bad:  # entries skipped by an earlier --skip-bad run are decoded (or fail) again
            done = {i: r for i, r in done.items() if "skipped" not in r}
        mine = [b for b in mine if not all(i in done for i in b)]
        writer = PartialWriter(partial_path(out_dir, mode, rank))
    indices = [i for b in mine for i in b]
    instructions = data.Instructions(args.instructions)
    if mode == "st":
        loader = speech_batches(lsm, entries, indices, args.batch_size, instructions, args.num_workers,
                                skip_bad=args.skip_bad)
    else:
        loader = text_batches(entries, indices, args.batch_size, instructions)
    records = []
    bar = tqdm(zip(mine, loader), total=len(mine), desc=f"decode {mode}", unit="batch", disable=rank != 0,
               file=sys.stderr)
    for batch_indices, batch in bar:
        hyps = []
        if not data.is_empty(batch):
            with autocast(lsm, args.dtype):
                hyps = lsm.generate(batch, mode=mode, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        kept, out = iter(zip(batch["ids"], hyps)), []
        skipped, cut = set(batch.get("skipped", [])), set(batch.get("truncated", []))
        pending = next(kept, None)
        for i in batch_indices:
            e = entries[i]
            if pending is not None and pending[0] == e["id"]:
                out.append(dict(index=i, id=e["id"], src=e["text"], reference=e["translation"],
                                hypothesis=pending[1].replace("\n", " "), tgt_lang=e["tgt_lang"],
                                **({"truncated": True} if e["id"] in cut else {})))
                pending = next(kept, None)
            else:
                assert e["id"] in skipped, (e["id"], batch["ids"])  # no item may be dropped silently or reordered
                out.append(dict(index=i, id=e["id"], skipped="unreadable audio (--skip-bad)"))
        assert pending is None, pending
        if writer is not None:
            writer.write(out)
        else:
            records += out
    if writer is not None:
        writer.close()
        return None
    return sorted(gather(records, world), key=lambda r: r["index"])


def wait_for_partial(out_dir, modes, n, skip_bad, poll_seconds=2.0, say_every=300.0):
    """Wait, without any collective, until the partial files hold all n entries of every mode (without skip_bad, a
    hypothesis for each); -> {mode: records in manifest order}. Says on stderr what is still missing every
    `say_every` seconds."""
    t0 = last = time.time()
    while True:
        results = {m: {i: r for i, r in read_partial(out_dir, m).items() if skip_bad or "skipped" not in r}
                   for m in modes}
        missing = {m: n - len([i for i in r if 0 <= i < n]) for m, r in results.items()}
        if not any(missing.values()):
            return {m: [r[i] for i in range(n)] for m, r in results.items()}
        if time.time() - last > say_every:
            last = time.time()
            log(f"waiting for the other ranks' hypotheses ({time.time() - t0:.0f} s): still missing "
                + ", ".join(f"{m} {k}" for m, k in missing.items() if k))
        time.sleep(poll_seconds)


def finite_json(x):
    """x with every non-finite float replaced by None (NaN is not JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def write_atomic(path, text):
    runtime.atomic(path, lambda tmp: runtime.write_text(tmp, text))

# ----------------------------------------------------------------------------- alignment degree and Figure 5


def log_wasserstein(speech, speech_mask, text, text_mask, *, shift=0, eps=ot.EPS, n_iters=ot.N_ITERS,
                    cost="sqeuclidean"):
    """log W(speech_i, text_{(i - shift) mod B}) per pair -> (B,) float32. speech (B, n, d), speech_mask (B, n),
    text (B, m, d), text_mask (B, m), masks True = valid. shift = 0: the true pairs; shift = 1: each speech with
    the previous utterance's text (mismatched pairs). cost: the ground cost (model.cost_points: sqeuclidean,
    the paper's, or cosine). W is clamped at the smallest positive float: the log stays finite even for
    identical point clouds."""
    from model import cost_points  # here: --hyps and --table need no model stack
    text, text_mask = text.roll(shift, 0), text_mask.roll(shift, 0)
    x, y, scale = cost_points(speech.float(), text.float(), cost)
    w = scale * ot.wasserstein(x, y, speech_mask, text_mask, eps=eps, n_iters=n_iters)
    return w.clamp(min=torch.finfo(w.dtype).tiny).log()


def alignment_degree(speech, speech_mask, text, text_mask, *, shift=0, eps=ot.EPS, n_iters=ot.N_ITERS,
                     cost="sqeuclidean"):
    """The paper's alignment degree at one layer for one batch of states: mean_i log W(speech_i, text_i)
    (with `shift`, of mismatched pairs). Arguments as log_wasserstein."""
    return log_wasserstein(speech, speech_mask, text, text_mask, shift=shift, eps=eps, n_iters=n_iters,
                           cost=cost).mean().item()


def length_mean(h, mask):
    """(B, n, d), (B, n) -> (B, d): the mean over the valid positions (Figure 5's length-averaged states)."""
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.no_grad()
def representations(lsm, entries, pairs, layers, args, rank, world, pooled):
    """For the test pairs entries[pairs]: per pair, log W at each layer for the true pair and for a mismatched one
    (speech with the previous transcript of its batch), and (if `pooled`) the length-averaged layer-0 speech and
    text states. Speech states: model.speech_forward at the positions of --align-positions (model.alignment_mask:
    the real windows, or all the LLM saw); text: model.text_forward. -> records on every rank, in the order of
    `pairs`."""
    from model import alignment_mask
    mine = [pairs[k] for k in shard(len(pairs), rank, world)]
    instructions = data.Instructions(args.instructions)
    loader = speech_batches(lsm, entries, mine, args.batch_size, instructions, args.num_workers)
    records, k = [], 0
    for batch in tqdm(loader, desc="speech/text states", unit="batch", disable=rank != 0, file=sys.stderr):
        with autocast(lsm, args.dtype):
            out = lsm.speech_forward(batch, layers)
            text, text_mask = lsm.text_forward(batch["transcripts"], batch["instructions"], layers)
        hs, sm = out["hidden"], alignment_mask(out, args.align_positions).to(lsm.device)
        kw = dict(eps=args.ot_eps, n_iters=args.ot_iters, cost=args.ot_cost)
        matched = {l: log_wasserstein(hs[l], sm, text[l], text_mask, **kw).tolist() for l in layers}
        B = len(batch["ids"])  # mismatched needs a second utterance in the batch
        shifted = {l: log_wasserstein(hs[l], sm, text[l], text_mask, shift=1, **kw).tolist() if B > 1 else [None]
                   for l in layers}
        if pooled:
            s0 = length_mean(hs[0].float(), sm).cpu().numpy()
            t0 = length_mean(text[0].float(), text_mask).cpu().numpy()
        for b in range(B):
            rec = dict(index=mine[k], log_w={l: matched[l][b] for l in layers},
                       log_w_mismatched={l: shifted[l][b] for l in layers})
            if pooled:
                rec.update(speech0=s0[b], text0=t0[b])
            records.append(rec)
            k += 1
    return gather(records, world)


def summarize_alignment(records, layers):
    """Per-pair records -> {"layers", "num_pairs", "log_w": {l: A_l}, "mean", "mismatched": {l: ...},
    "mismatched_mean"} (layer keys are strings, as in JSON)."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None
    a = {str(l): mean([r["log_w"][l] for r in records]) for l in layers}
    b = {str(l): mean([r["log_w_mismatched"][l] for r in records]) for l in layers}
    return dict(layers=list(layers), num_pairs=len(records), log_w=a, mean=mean(a.values()), mismatched=b,
                mismatched_mean=mean(b.values()))


def _plot_libs():
    """The optional libraries of --tsne and --fig6, or an error saying what to install."""
    try:
        from matplotlib.figure import Figure
        from scipy.stats import gaussian_kde
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise EvalError(f"--tsne and --fig6 need scikit-learn, scipy and matplotlib ({e}): "
                        f"pip install scikit-learn matplotlib") from None
    return Figure, gaussian_kde, TSNE


def tsne_figure(speech, text, path, seed=0, title=""):
    """The paper's Figure 5 for one model: speech (N, d) and text (N, d) vectors -> PNG (see tsne_panels).
    Returns the (2N, 2) embedding (speech rows first)."""
    return tsne_panels([(title, speech, text)], path, seed=seed)[0]


def tsne_panels(panels, path, seed=0):
    """The paper's Figure 5: one panel per model, [(title, speech (N, d), text (N, d))] -> one PNG, panels side by
    side. Per panel: t-SNE of its 2N points to 2-D (scikit-learn; the same settings for every panel: perplexity
    min(30, (2N - 1) / 3), PCA initialisation, random_state `seed`), a scatter and a Gaussian kernel-density contour
    (scipy) per modality, on the same axes scale in every panel (shared limits, the densities on one grid) so that
    distances compare across panels. FIG_INCHES per panel at FIG_DPI. Returns each panel's (2N, 2) embedding
    (speech rows first)."""
    Figure, gaussian_kde, TSNE = _plot_libs()
    embedded = []
    for title, speech, text in panels:
        speech, text = np.asarray(speech, np.float64), np.asarray(text, np.float64)
        if len(speech) < 3:
            raise EvalError(f"--tsne needs at least 3 pairs, got {len(speech)}")
        x = np.concatenate([speech, text])
        perplexity = min(30.0, (len(x) - 1) / 3)  # sklearn's default 30 must stay below the number of points
        embedded.append(TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x))
    every = np.concatenate(embedded)
    lo, hi = every.min(0), every.max(0)
    pad = 0.15 * (hi - lo + 1e-9)
    lo, hi = lo - pad, hi + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
    fig = Figure(figsize=(FIG_INCHES[0] * len(panels), FIG_INCHES[1]), dpi=FIG_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (title, speech, _), xy in zip(axes, panels, embedded):
        n = len(speech)
        for pts, name, color, cmap in ((xy[:n], "speech", "tab:blue", "Blues"), (xy[n:], "text", "tab:red", "Reds")):
            try:
                density = gaussian_kde(pts.T)(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
                # levels at fixed fractions of the peak: none near 0, where a contour would wander over the panel
                ax.contour(gx, gy, density, levels=density.max() * np.array([0.1, 0.25, 0.45, 0.65, 0.85]),
                           cmap=cmap, linewidths=1.0)
            except (np.linalg.LinAlgError, ValueError) as e:  # e.g. points on a line: no 2-D density
                log(f"--tsne: no density contour for {name} ({e})")
            ax.scatter(pts[:, 0], pts[:, 1], s=8, color=color, alpha=0.6, label=f"{name} ({n} utterances)")
        ax.set_title(title or "t-SNE", fontsize=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("t-SNE of length-averaged layer-0 states (speech: projector output; text: token embeddings)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=FIG_DPI)
    return embedded

# ----------------------------------------------------------------------------- summary table


def read_metrics(path):
    """A metrics.json for --table / --fig6 -> dict; an EvalError names the file and what is wrong with it (not
    JSON, not an object, a score that is not a number). A bare NaN or Infinity (older files) reads as missing."""
    m = read_json_object(path, "a metrics file")
    def bad(where, what):
        raise EvalError(f"{path}: {where} {what} (is this evaluate.py's metrics.json?)")
    def number(where, x):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            bad(where, f"must be a number, got {x!r}")
    if not isinstance(m.get("name", ""), str):
        bad('"name"', f"must be a string, got {m['name']!r}")
    if not isinstance(m.get("bleu", {}), dict):
        bad('"bleu"', "must be an object {mode: {language: scores}}")
    for mode, langs in m.get("bleu", {}).items():
        if not isinstance(langs, dict):
            bad(f'"bleu" -> {mode!r}', "must be an object {language: scores}")
        for lang, sc in langs.items():
            where = f'"bleu" -> {mode!r} -> {lang!r}'
            if not isinstance(sc, dict):
                bad(where, "must be an object with \"score\"")
            for key in ("score", "chrf"):
                number(f"{where} -> {key!r}", sc.get(key))
            bs = sc.get("paired_bs")
            if bs is not None:
                if not isinstance(bs, dict) or not isinstance(bs.get("bleu"), dict):
                    bad(f"{where} -> 'paired_bs'", "must be an object with \"bleu\": {\"p\": ...}")
                number(f"{where} -> 'paired_bs' -> 'bleu' -> 'p'", bs["bleu"].get("p"))
    a = m.get("alignment")
    if a is not None:
        if not isinstance(a, dict) or not isinstance(a.get("log_w", {}), dict) or \
                not isinstance(a.get("layers", []), list):
            bad('"alignment"', "must be an object with \"layers\", \"log_w\" and \"mean\"")
        for key in ("mean", "mismatched_mean"):
            number(f'"alignment" -> {key!r}', a.get(key))
        for l, v in a.get("log_w", {}).items():
            number(f'"alignment" -> "log_w" -> {l!r}', v)
    if not isinstance(m.get("train") or {}, dict):
        bad('"train"', "must be an object")
    return m


def group_runs(runs):
    """Runs that share a name are seeds of one system -> [(name, [runs])], systems in order of first appearance."""
    groups = {}
    for m in runs:
        groups.setdefault(m.get("name") or "?", []).append(m)
    return list(groups.items())


def seed_of(m):
    return (m.get("train") or {}).get("seed")


def mean_sd(xs, digits):
    """'mean' of one value, 'mean ± sd' of several (sd: sample standard deviation, n - 1), '-' of none; a value
    missing from some seeds is said: '(k of n)'."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    cell = f"{np.mean(vals):.{digits}f}" + (f" ± {np.std(vals, ddof=1):.{digits}f}" if len(vals) > 1 else "")
    return cell + (f" ({len(vals)} of {len(xs)})" if len(vals) < len(xs) else "")


def same_seed_pvalues(group, baseline_group, mode, lang, metric="bleu"):
    """The paired-bootstrap p-values of a system's seeds against the first system (the baseline): for each seed,
    the p of its metrics.json whose baseline hypotheses (sha256) are those of a baseline run with the same
    training seed (where the seeds are known). -> list of p, one per seed that has one; None for a seed whose
    hypotheses are the baseline's (no difference: SacreBLEU's p would be its floor)."""
    def scores(m):
        return m.get("bleu", {}).get(mode, {}).get(lang) or {}
    base = {scores(b).get("sha256"): seed_of(b) for b in baseline_group if scores(b).get("sha256")}
    ps = []
    for m in group:
        bs = scores(m).get("paired_bs") or {}
        if bs.get("baseline_sha256") not in base:
            continue
        seed, base_seed = seed_of(m), base[bs["baseline_sha256"]]
        if seed is not None and base_seed is not None and seed != base_seed:
            continue
        p = (bs.get(metric) or {}).get("p")
        if bs.get("identical") or scores(m).get("sha256") == bs["baseline_sha256"]:
            ps.append(None)
        elif p is not None:
            ps.append(p)
    return ps


def p_cell(ps, n):
    """p-values of the seeds of a system: each (up to 3 seeds) or their median with the count below 0.05;
    "same" (counted as p = 1) for a seed whose hypotheses are the baseline's."""
    if not ps:
        return "-"
    if len(ps) <= 3:
        cell = ", ".join("same" if p is None else f"{p:.3f}" for p in ps)
    else:
        ps1 = [1.0 if p is None else p for p in ps]
        cell = f"median {np.median(ps1):.3f}, {sum(p < 0.05 for p in ps1)}/{len(ps)} < 0.05"
    return cell + (f" ({len(ps)} of {n} seeds)" if len(ps) < n else "")


def summary_table(runs):
    """Metrics dicts (one per run) -> a Markdown table in the form of the paper's tables: one row per system (runs
    that share a name are its seeds: mean ± sd, and a "seeds" column when a system has several), BLEU and chrF
    per mode and target language (Tables 2-5), the paired-bootstrap p-value of BLEU against the first system's
    same-seed run where the runs have one ("p"), and the alignment degree (log W per layer, mean, and the
    mismatched-pair level; Figure 6)."""
    groups = group_runs(runs)
    cols = []  # (header, cell(group index, runs)), in order of first appearance
    def add(header, cell):
        if header not in [h for h, _ in cols]:
            cols.append((header, cell))
    def score(mode, lang, key):
        return lambda k, g: mean_sd([m.get("bleu", {}).get(mode, {}).get(lang, {}).get(key) for m in g], 1)
    def pvals(mode, lang):
        return lambda k, g: "" if k == 0 else p_cell(same_seed_pvalues(g, groups[0][1], mode, lang), len(g))
    for m in runs:
        for mode in ("st", "mt"):
            for lang, sc in m.get("bleu", {}).get(mode, {}).items():
                add(f"{mode.upper()} {lang}", score(mode, lang, "score"))
                if sc.get("chrf") is not None:
                    add(f"{mode.upper()} {lang} chrF", score(mode, lang, "chrf"))
                if any(same_seed_pvalues(g, groups[0][1], mode, lang) for _, g in groups[1:]):
                    add(f"{mode.upper()} {lang} p", pvals(mode, lang))
        if m.get("alignment"):
            for l in m["alignment"].get("layers", []):
                add(f"log W L{l}", lambda k, g, l=str(l):
                    mean_sd([(m.get("alignment") or {}).get("log_w", {}).get(l) for m in g], 3))
    if any(m.get("alignment") for m in runs):
        add("log W mean", lambda k, g: mean_sd([(m.get("alignment") or {}).get("mean") for m in g], 3))
        add("mismatched", lambda k, g: mean_sd([(m.get("alignment") or {}).get("mismatched_mean") for m in g], 3))
    seeds = any(len(g) > 1 for _, g in groups)
    header = ["Model"] + (["seeds"] if seeds else []) + [h for h, _ in cols]
    rows = [[name] + ([str(len(g))] if seeds else []) + [cell(k, g) for _, cell in cols]
            for k, (name, g) in enumerate(groups)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _fmt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def mrr_table(path):
    """--mrr: select_layers.py's layers.json -> the paper's Figure 4 as a table (MRR per layer, the selected
    layers, and the chance level of the retrieval: a random ranking of n candidates has MRR H_n / n)."""
    m = read_json_object(path, "select_layers.py's layers.json")
    try:
        mrr = {int(l): float(v) for l, v in m["mrr"].items()}
        selected, n = [int(l) for l in m["selected"]], int(m["num_pairs"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EvalError(f"{path}: not select_layers.py's layers.json (needs \"mrr\", \"selected\", "
                        f"\"num_pairs\"; {type(e).__name__}: {e})") from None
    chance = sum(1 / k for k in range(1, n + 1)) / n
    lines = ["| Layer | MRR | selected |", "|---|---|---|"]
    lines += [f"| {l} | {v:.4f} | {'yes' if l in selected else ''} |" for l, v in sorted(mrr.items())]
    lines.append(f"\n{n} candidates: chance level MRR = H_n / n = {chance:.4f}; threshold "
                 f"{m.get('threshold', '?')}; selected layers: {' '.join(map(str, selected)) or 'none'}")
    return "\n".join(lines)


def read_json_object(path, what):
    """A JSON file holding an object -> dict, or an EvalError naming the file (bare NaN / Infinity read as None)."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f, parse_constant=lambda name: None)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not {what}: invalid JSON at line {e.lineno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not {what}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise EvalError(f"{path}: a folder, not {what}") from None
    if not isinstance(m, dict):
        raise EvalError(f"{path}: not {what}: a JSON {type(m).__name__}, not an object")
    return m

# ----------------------------------------------------------------------------- Figure 6


def figure6(runs, paths, path, lang=None):
    """The paper's Figure 6: ST BLEU against the alignment degree (mean log W over the layers every run was measured
    at; lower = speech and text states closer), one labelled point per system: the run itself, or the mean over its
    seeds with ± sd bars on both axes and each seed as a small dot. -> PNG at `path`; returns the plotted
    [(name, x mean, y mean, n)]."""
    Figure = _plot_libs()[0]
    layers = None
    for m, p in zip(runs, paths):
        a = m.get("alignment") or {}
        if a.get("mean") is None:
            raise EvalError(f"{p}: no alignment degree (evaluate.py --alignment LAYER ...); --fig6 plots it")
        if layers is None:
            layers, first = a.get("layers"), p
        elif a.get("layers") != layers:
            raise EvalError(f"{p}: alignment measured at layers {a.get('layers')}, {first} at {layers}: "
                            f"--fig6 compares one degree (the same layers) across runs")
        st = m.get("bleu", {}).get("st", {})
        key = lang or next(iter(st), None)
        if st.get(key, {}).get("score") is None:
            raise EvalError(f"{p}: no ST BLEU" + (f" for {key}" if key else "") + "; --fig6 plots ST BLEU")
        lang = key
    fig = Figure(figsize=FIG6_INCHES, dpi=FIG_DPI)
    ax = fig.subplots()
    colors = [f"C{i}" for i in range(10)]
    out = []
    for k, (name, g) in enumerate(group_runs(runs)):
        xs = np.array([m["alignment"]["mean"] for m in g])
        ys = np.array([m["bleu"]["st"][lang]["score"] for m in g])
        c = colors[k % len(colors)]
        label = f"{name} ({len(g)} seeds)" if len(g) > 1 else name
        if len(g) > 1:
            ax.scatter(xs, ys, s=12, color=c, alpha=0.35, linewidths=0)
            ax.errorbar(xs.mean(), ys.mean(), xerr=xs.std(ddof=1), yerr=ys.std(ddof=1), fmt="o", color=c,
                        capsize=3, markersize=7, label=label)
        else:
            ax.plot(xs, ys, "o", color=c, markersize=7, label=label)
        out.append((name, float(xs.mean()), float(ys.mean()), len(g)))
    which = "layer " + ", ".join(map(str, layers)) if len(layers) == 1 else "layers " + ", ".join(map(str, layers))
    ax.set_xlabel(f"alignment degree: mean log W(speech, text) at {which}  (lower = closer)")
    ax.set_ylabel(f"ST BLEU ({lang})")
    ax.set_title("ST BLEU against the speech-text alignment degree (paper Figure 6)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    # the legend below the axes, so that no name next to a point can hide under it
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, title_fontsize=8,
              title="mean ± sd over seeds (small dots: each seed)" if any(n > 1 for *_, n in out) else None)
    fig.tight_layout()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox
    renderer = FigureCanvasAgg(fig).get_renderer()
    # each name next to its point, where it covers no other name and no point (a 16-pixel box around each) ...
    placed = [Bbox.from_bounds(px - 8, py - 8, 16, 16) for px, py in ax.transData.transform([(x, y) for _, x, y, _
                                                                                              in out])]
    inside = ax.get_window_extent(renderer)  # ... and is not cut by the edge of the plot
    for k, (name, x, y, _) in enumerate(out):
        for dx, dy, ha in ((8, 6, "left"), (8, -14, "left"), (-8, 6, "right"), (-8, -14, "right"), (8, 20, "left"),
                           (8, -28, "left"), (-8, 20, "right"), (-8, -28, "right")):
            label = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha,
                                color=colors[k % len(colors)])
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) and inside.x0 <= box.x0 and box.x1 <= inside.x1 \
                    and inside.y0 <= box.y0 and box.y1 <= inside.y1:
                break
            label.remove()
        else:  # nowhere free: the first place (the legend still names the colour)
            label = ax.annotate(name, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8,
                                color=colors[k % len(colors)])
        placed.append(label.get_window_extent(renderer))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=FIG_DPI)
    return out

# ----------------------------------------------------------------------------- command line


def read_entries(args):
    """--manifest (ST entries; errors name the file and line) or --audio files -> entries as data.read_manifest."""
    if args.audio:
        lang = data.normalize_lang(args.tgt_lang or "zh")
        return [dict(id=p, audio=p, task="st", text=None, translation=None, tgt_lang=lang, where=f"--audio {p}")
                for p in args.audio]
    try:
        entries = data.read_manifest(args.manifest)
    except ValueError as e:  # names the file and line
        raise EvalError(str(e)) from None
    for e in entries:
        if e["task"] != "st":
            raise EvalError(f"{e['where']}: task {e['task']!r}; evaluate.py scores speech translation (task 'st')")
        if e["text"] is None and ("mt" in args.mode or args.alignment or args.tsne):
            raise EvalError(f"{e['where']}: no source transcript, which --mode mt, --alignment and --tsne need")
    if args.limit:
        entries = entries[:args.limit]
    if not entries:
        raise EvalError(f"{args.manifest}: no entries")
    return entries


def run(args):
    """Model path: decode (--manifest or --audio), score, alignment, t-SNE; rank 0 writes and prints."""
    entries = read_entries(args)
    check_ckpt(args)
    if args.manifest and "none" not in args.mode:  # fail before any decoding
        for lang in sorted({e["tgt_lang"] for e in entries}):
            check_tokenizer(bleu_tokenizer(lang, args.tokenize))
    baselines = read_baselines(args, entries)
    if args.tsne:
        _plot_libs()
    out_dir = None
    if not args.audio:
        out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval",
                                                  os.path.splitext(os.path.basename(args.manifest))[0])
    modes = [m for m in args.mode if m != "none"]
    with runtime.process_group(args.dist_timeout) as (rank, world, device):  # nccl on GPUs, gloo on CPUs
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            if rank == 0:
                runtime.clean_temporaries(out_dir, OWN_FILES)  # what a kill during write_atomic left
            if modes:
                prepare_partial(out_dir, decoding_config(args, entries), rank, world)
        lsm = load_model(args, device, verbose=rank == 0 and not args.audio)
        layers = sorted(set(args.alignment or []) | ({0} if args.tsne else set()))
        if any(not 0 <= l <= lsm.n_layers for l in layers):  # say so now, not after hours of decoding
            raise EvalError(f"--alignment {' '.join(map(str, args.alignment))}: the LLM has layers 0 (embeddings) "
                            f".. {lsm.n_layers}")
        results = {mode: decode(lsm, entries, mode, args, rank, world, out_dir) for mode in modes}
        if out_dir is not None and modes:  # every rank: the closing barrier must not wait on any decoding
            results = wait_for_partial(out_dir, modes, len(entries), args.skip_bad)
        reps = None
        if layers:
            skipped = {r["index"] for rs in results.values() for r in rs if "skipped" in r}
            pool = [i for i in range(len(entries)) if i not in skipped]
            pairs = random.Random(args.seed).sample(pool, min(args.num_pairs, len(pool)))
            reps = representations(lsm, entries, pairs, layers, args, rank, world, pooled=bool(args.tsne))
        if args.tsne_base:  # Figure 5's first panel: the base model on the same pairs (one model in memory at once)
            del lsm
            base = load_model(argparse.Namespace(**{**vars(args), "ckpt": args.tsne_base}), device, verbose=False)
            base_reps = representations(base, entries, pairs, [0], args, rank, world, pooled=True)
    if rank != 0:
        return None
    if args.audio:
        for r in results["st"]:
            print(r["hypothesis"] if "hypothesis" in r else "")
        return results

    metrics = dict(name=args.name or os.path.relpath(args.ckpt), ckpt=args.ckpt, manifest=args.manifest,
                   n=len(entries), world_size=world, train=training_run(args.ckpt), bleu={}, skipped={}, truncated={})
    for mode, records in results.items():
        skipped = [r for r in records if "skipped" in r]
        cut = [r["id"] for r in records if r.get("truncated")]
        if cut:
            metrics["truncated"][mode] = cut
            log(f"{len(cut)} clip(s) longer than Whisper's input window were cut to it (listed in metrics.json)")
        records = [r for r in records if "skipped" not in r]
        results[mode] = records
        write_atomic(os.path.join(out_dir, f"hyps.{mode}.jsonl"), "".join(
            json.dumps({k: r[k] for k in ("id", "src", "reference", "hypothesis", "tgt_lang")}, ensure_ascii=False)
            + "\n" for r in records))
        if skipped:
            metrics["skipped"][mode] = [r["id"] for r in skipped]
            log(f"--skip-bad: {len(skipped)} of {len(entries)} entries have unreadable audio and are NOT in the {mode} "
                f"BLEU below: {[r['id'] for r in skipped][:10]}{' ...' if len(skipped) > 10 else ''} "
                f"(all listed in metrics.json)")
        if not records:
            raise EvalError(f"{args.manifest}: no entry of --mode {mode} could be decoded (all skipped)")
        metrics["bleu"][mode] = score_records(records, args.tokenize)
        if mode in baselines:
            path, base = baselines[mode]
            add_paired(metrics["bleu"][mode], *common_segments(records, base, f"the {mode} hypotheses", path),
                       args.tokenize, source=path, whole_baseline=base)
        for lang, s in metrics["bleu"][mode].items():
            print(score_report(f"{mode.upper()} {lang}", s, len(skipped)))
    if args.alignment:
        metrics["alignment"] = summarize_alignment(reps, args.alignment)
        a = metrics["alignment"]
        print(f"alignment degree (mean log Wasserstein, {a['num_pairs']} pairs): "
              + ", ".join(f"layer {l} {_fmt(v, 4)}" for l, v in a["log_w"].items())
              + f"; mean {_fmt(a['mean'], 4)} (mismatched pairs {_fmt(a['mismatched_mean'], 4)})")
    if args.tsne:
        panels = [(name, np.stack([r["speech0"] for r in rs]), np.stack([r["text0"] for r in rs])) for name, rs in
                  ([(args.tsne_base_name, base_reps)] if args.tsne_base else []) + [(metrics["name"], reps)]]
        tsne_panels(panels, args.tsne, seed=args.seed)
        metrics["tsne"] = dict(path=args.tsne, num_pairs=len(reps), panels=[name for name, *_ in panels],
                               base_ckpt=args.tsne_base)
        print(f"Figure 5 (t-SNE of layer 0, {len(reps)} pairs; {' | '.join(n for n, *_ in panels)}): {args.tsne}")
    metrics["args"] = vars(args)
    metrics = finite_json(metrics)
    write_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1, ensure_ascii=False,
                                                                   allow_nan=False))
    _remove_partial(out_dir)
    print(f"\nhypotheses and metrics.json in {out_dir}\n")
    print(summary_table([metrics]))
    metrics["records"] = results  # for callers (tests); not written
    return metrics


def _remove_partial(out_dir):
    """The partial hypotheses are merged into hyps.*.jsonl: remove them (rank 0, every rank has finished)."""
    folder = os.path.join(out_dir, PARTIAL)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    g = p.add_argument_group("what to evaluate (one of --manifest, --audio, --hyps, --table, --mrr)")
    g.add_argument("--ckpt", help="trainable state (LSM.save_trainable), e.g. runs/stage3/best.safetensors; "
                                  "its .json sidecar names the base checkpoints")
    g.add_argument("--manifest", help="test manifest (JSON lines, task st; data.py format)")
    g.add_argument("--audio", nargs="+", metavar="FILE", help="translate these audio files; one line each on stdout")
    g.add_argument("--hyps", metavar="FILE", help="score a hypotheses file (JSON lines: reference, hypothesis, "
                                                  "tgt_lang); no model; last stdout line is JSON")
    g.add_argument("--table", nargs="+", metavar="METRICS",
                   help="print the summary table of these metrics.json files (runs with the same name: seeds of one "
                        "system, mean ± sd; the first system is the baseline of the p-values)")
    g.add_argument("--mrr", metavar="LAYERS_JSON", help="print select_layers.py's layers.json as a table (Figure 4)")
    g = p.add_argument_group("base checkpoints (default: as saved in CKPT.json)")
    g.add_argument("--whisper", help="Whisper checkpoint dir or hub id")
    g.add_argument("--beats", help="BEATs checkpoint file")
    g.add_argument("--llm", help="LLM dir or hub id")
    g.add_argument("--llm-dtype", choices=["bfloat16", "float16", "float32"], help="dtype of the frozen LLM")
    g.add_argument("--dtype", choices=list(AUTOCAST_DTYPES),
                   help="autocast dtype of the forwards, as training's --dtype (default: the LLM's dtype; float32 = "
                        "no autocast)")
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", nargs="+", choices=["st", "mt", "none"], default=["st"],
                   help="st: speech in; mt: the transcript in place of the speech, same prompt (Table 5); "
                        "none: no decoding (only --alignment / --tsne)")
    g.add_argument("--num-beams", type=int, default=4, help="beam size (1 = greedy); SALMONN: 4")
    g.add_argument("--max-new-tokens", type=int, default=200, help="SALMONN: 200")
    g.add_argument("--batch-size", type=int, default=8, help="utterances per batch and process")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading audio")
    g.add_argument("--instructions", help="JSON file of instructions: this project's format or SALMONN's "
                                          "prompts/test_prompt.json (data.Instructions; a list: one per item, seeded "
                                          "by its index); default: 'Translate the speech into <language>.'")
    g.add_argument("--limit", type=int, help="evaluate only the first N entries of the manifest")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out entries whose audio cannot be read (missing, undecodable, NaN/Inf samples) instead "
                        "of stopping: listed in metrics.json under 'skipped', BLEU over the rest")
    g.add_argument("--dist-timeout", type=float, default=60.0, metavar="MINUTES",
                   help="torchrun: a collective waiting longer than this for another process ends the evaluation "
                        "with an error (a dead or stuck rank). Decoding itself waits on no collective (ranks write "
                        "their hypotheses to files that rank 0 merges), so this need only cover the slowest rank's "
                        "model load and the --alignment / --tsne pass")
    g = p.add_argument_group("BLEU")
    g.add_argument("--tokenize", help="SacreBLEU tokenizer for every language (default: zh -> zh, ja -> ja-mecab, "
                                      "else 13a)")
    g.add_argument("--tgt-lang", help="target language of --audio (default zh) and of --hyps lines without tgt_lang")
    g = p.add_argument_group("significance: paired bootstrap resampling of BLEU and chrF against a baseline "
                             "(SacreBLEU's, 1000 resamples, seed 12345)")
    g.add_argument("--baseline", metavar="FILE", help="with --hyps: the baseline's hypotheses on the same references")
    g.add_argument("--baseline-hyps", metavar="DIR_OR_FILE",
                   help="with --manifest: the baseline run's evaluation folder (its hyps.<mode>.jsonl) or, for one "
                        "--mode, its hypotheses file; the test is recorded in metrics.json")
    g = p.add_argument_group("representations (paper Figures 5 and 6)")
    g.add_argument("--alignment", nargs="+", type=int, metavar="LAYER",
                   help="alignment degree at these LLM layers (0 = embeddings), e.g. 0 1 (the paper's selection)")
    g.add_argument("--tsne", metavar="FILE.png", help="Figure 5: t-SNE of layer-0 speech and text states")
    g.add_argument("--tsne-base", metavar="CKPT", help="Figure 5's first panel: the base model's checkpoint, drawn on "
                                                      "the same pairs with the same settings and axes")
    g.add_argument("--tsne-base-name", default="base", help="title of the --tsne-base panel")
    g.add_argument("--num-pairs", type=int, default=1000, help="test pairs for --alignment and --tsne (paper: 1000)")
    g.add_argument("--seed", type=int, default=0, help="sampling of the pairs; t-SNE")
    g.add_argument("--ot-eps", type=float, default=ot.EPS, help="relative entropic epsilon of ot.wasserstein")
    g.add_argument("--ot-iters", type=int, default=ot.N_ITERS, help="Sinkhorn iterations")
    g.add_argument("--align-positions", default="real", choices=["real", "all"],
                   help="speech positions of --alignment / --tsne: real = windows overlapping real audio (this "
                        "project's reading of the paper), all = every speech position the LLM saw (the same with "
                        "--speech-tokens real)")
    g.add_argument("--ot-cost", default="sqeuclidean", choices=["sqeuclidean", "cosine"],
                   help="OT ground cost of --alignment: sqeuclidean |x - y|^2 (paper eq. 1); cosine 1 - cos(x, y)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="hyps.*.jsonl and metrics.json (default: <ckpt folder>/eval/<manifest name>)")
    g.add_argument("--name", help="row name in the summary table (default: the --ckpt path); runs of one system "
                                  "over several seeds share it")
    g.add_argument("--fig6", metavar="FILE.png", help="with --table: Figure 6, ST BLEU against the alignment degree "
                                                      "of the runs (mean ± sd per system over its seeds)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    chosen = [f for f in ("manifest", "audio", "hyps", "table", "mrr") if getattr(args, f)]
    if len(chosen) != 1:
        p.error(f"give exactly one of --manifest, --audio, --hyps, --table, --mrr (got {', '.join(chosen) or 'none'})")
    for flag, needs in (("baseline", "hyps"), ("baseline_hyps", "manifest"), ("fig6", "table"), ("tsne_base", "tsne")):
        if getattr(args, flag) and not getattr(args, needs):
            p.error(f"--{flag.replace('_', '-')} goes with --{needs}")
    if args.mrr:
        print(mrr_table(args.mrr))
        return None
    if args.table:
        runs = [read_metrics(path) for path in args.table]
        if args.fig6:
            _plot_libs()
        print(summary_table(runs))
        if args.fig6:
            figure6(runs, args.table, args.fig6)
            print(f"\nFigure 6 (ST BLEU against the alignment degree, {len(group_runs(runs))} systems): {args.fig6}")
        return runs
    if args.hyps:
        return score_hyps_file(args)
    if not args.ckpt:
        p.error("--manifest and --audio need --ckpt")
    if "none" in args.mode and (len(args.mode) > 1 or not (args.alignment or args.tsne)):
        p.error("--mode none goes alone, with --alignment and/or --tsne")
    if args.baseline_hyps and "none" in args.mode:
        p.error("--baseline-hyps compares hypotheses: not with --mode none")
    if args.audio and (args.mode != ["st"] or args.alignment or args.tsne):
        p.error("--audio only translates speech: no --mode mt, --alignment or --tsne (they need transcripts)")
    for flag in ("num_beams", "max_new_tokens", "batch_size", "num_pairs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        args.instructions_used = data.Instructions(args.instructions).describe()  # recorded in metrics.json
    except ValueError as e:  # names the file
        raise EvalError(f"--instructions {e}") from None
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except (EvalError, data.UserError, FileNotFoundError, FileExistsError) as e:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        text = str(e)
        if "\nOriginal Traceback" in text:  # raised in a DataLoader worker: its last line is the message
            text = [l for l in text.splitlines() if l.strip()][-1].split(": ", 1)[-1]
        sys.exit(f"evaluate.py: error: {f'[rank {rank}] ' if rank else ''}{text}")
