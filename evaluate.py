"""Evaluate a trained AI-STA model as the paper does: SacreBLEU (BLEU and chrF) on speech translation (ST) and on
zero-shot text translation (MT), and the alignment degree of speech and text states. Read top to bottom: the scores,
the decoding, the alignment degree, then `run`, which does them in order. After it, beyond the paper: the paired
bootstrap against a baseline and the scoring of a hypotheses file. Tables over runs and seeds and the figures are
results.py; the per-rank files of a sharded, resumable evaluation are shards.py.

The paper's measurements (CoVoST 2 test manifests from prepare_data.py, checkpoints from the stage scripts):

    Table 2, 3, 4 (ST BLEU)   python evaluate.py --ckpt runs/aista-zh/best.safetensors \\
                                  --manifest data/covost/covost2.en-zh.test.jsonl --output-dir runs/aista-zh/eval-test
    Table 5 (ST and MT BLEU)  python evaluate.py --ckpt ... --manifest ... --mode st mt
    significance vs base      python evaluate.py --ckpt ... --manifest ... --baseline-hyps runs/base-zh/eval-test
    Figure 6 (alignment)      python evaluate.py --ckpt ... --manifest ... --alignment 0 1 --num-pairs 1000
    Figure 5 (t-SNE)          python evaluate.py --ckpt ... --manifest ... --tsne fig5.png --tsne-base BASE_CKPT
    one table, several runs   python evaluate.py --table runs/base-zh/eval-test/metrics.json \\
                                  runs/aista-zh/eval-test/metrics.json
    Figure 6 from the runs    python evaluate.py --table ... --fig6 fig6.png
    Figure 4 as a table       python evaluate.py --mrr runs/stage2/layers.json
    score a hypotheses file   python evaluate.py --hyps hyps.st.jsonl [--baseline base.st.jsonl] [--tgt-lang zh]
    translate a few files     python evaluate.py --ckpt ... --audio a.wav b.flac --tgt-lang ja
    on 8 GPUs                 torchrun --nproc_per_node 8 evaluate.py --ckpt ... --manifest ...

BLEU: SacreBLEU corpus BLEU (one reference, case-sensitive) with the tokenizer of the target language:
zh -> "zh" (characters for CJK; 13a on Chinese gives near-zero BLEU), ja -> "ja-mecab" (needs
`pip install "sacrebleu[ja]"`: mecab-python3 + ipadic), any other -> "13a"; printed with its signature.
chrF: SacreBLEU's CHRF with its defaults (chrF2: character 6-grams, beta 2, no tokenizer), next to every BLEU.
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
Figure 5 (--tsne) draws the length-averaged layer-0 states of the same pairs (results.tsne_panels).

Paired bootstrap (--baseline with --hyps, --baseline-hyps with --manifest): SacreBLEU's own test
(sacrebleu.significance.PairedTest, 1000 resamples, seed 12345), the numbers of
`sacrebleu REF -i BASE SYS --paired-bs -m bleu chrf -tok TOK`: per metric the bootstrap mean and 95% half-width
of the system and the p-value of its difference to the baseline; both files must hold the same segments.

Processes: under torchrun every rank decodes its share of the manifest's batches and appends the hypotheses to its
own file as they are decoded; rank 0 merges them, and a killed evaluation run again with the same settings decodes
only what is missing (shards.py). --skip-bad leaves out entries whose audio cannot be read (listed under "skipped"
in metrics.json, BLEU over the rest, said on stderr). CPU: gloo; GPU: nccl.

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

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import ot
import results
import runtime
import shards
from data import UserError

TOKENIZE_BY_LANG = {"zh": "zh", "ja": "ja-mecab"}  # every other target language: "13a"
DEFAULT_TOKENIZE = "13a"
OWN_FILES = ("hyps.st.jsonl", "hyps.mt.jsonl", "metrics.json")  # written atomically into --output-dir
JA_INSTALL = 'pip install "sacrebleu[ja]"'
BACKBONE_FLAGS = ("whisper", "beats", "llm", "llm_dtype")  # override what CKPT.json says


def log(*args):
    """Progress and notes go to stderr: stdout carries results only (scores, table, --audio translations)."""
    print(*args, file=sys.stderr, flush=True)

# ----------------------------------------------------------------------------- BLEU and chrF


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
            raise UserError(f"Japanese BLEU uses SacreBLEU's ja-mecab tokenizer, which needs MeCab and the IPA "
                            f"dictionary ({e}): {JA_INSTALL}") from None
    try:
        BLEU(tokenize=tokenize)
    except Exception as e:  # unknown name, or MeCab with the wrong dictionary (an installed unidic-lite can win)
        raise UserError(f"SacreBLEU tokenizer {tokenize!r} does not work here: {str(e).strip()}"
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


def hyps_digest(hyps):
    """SHA-256 of a list of hypotheses: recorded with every score so that --table can tell which run a paired
    bootstrap was computed against (the baseline's hypotheses), wherever the files have moved since."""
    return hashlib.sha256("\n".join(hyps).encode("utf-8")).hexdigest()

# ----------------------------------------------------------------------------- decoding


def load_model(args, device, verbose):
    """LSM.from_trainable(--ckpt): base checkpoints from CKPT.json unless --whisper/--beats/--llm/--llm-dtype say."""
    from model import LSM  # imported here: --hyps and --table need no torch model stack (transformers, peft)
    check_ckpt(args)
    overrides = {k: getattr(args, k) for k in BACKBONE_FLAGS if getattr(args, k) is not None}
    lsm = LSM.from_trainable(args.ckpt, verbose=verbose, **overrides)
    return lsm.to(device).eval()


def check_ckpt(args):
    if not os.path.isfile(args.ckpt) or not os.path.isfile(args.ckpt + ".json"):
        raise UserError(f"--ckpt {args.ckpt}: expected the trainable weights there and their build arguments in "
                        f"{args.ckpt}.json (both written by LSM.save_trainable)")


def autocast(lsm, dtype=None):
    """The precision of the forwards, as training's --dtype: autocast in `dtype` (--dtype; None: the LLM's dtype, so
    a bf16 LLM is evaluated as the default --dtype bfloat16 trained it) on any device; float32: no autocast.
    BEATs' fbank stays in float32 under any autocast (beats.BEATs.preprocess): float16 would overflow there."""
    dtype = config.DTYPES[dtype] if dtype else lsm.llm.get_input_embeddings().weight.dtype
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
                      collate_fn=data.Collator(fe), pin_memory=lsm.device.type == "cuda")


def text_batches(entries, indices, batch_size, instructions):
    """Transcript-only batches for --mode mt: the fields model.generate(mode="mt") reads, and no audio."""
    for k in range(0, len(indices), batch_size):
        batch = [(i, entries[i]) for i in indices[k:k + batch_size]]
        yield dict(ids=[e["id"] for _, e in batch], transcripts=[e["text"] for _, e in batch],
                   instructions=[instructions("st", e["tgt_lang"], key=i) for i, e in batch],
                   targets=[e["translation"] for _, e in batch], tasks=["st"] * len(batch),
                   tgt_langs=[e["tgt_lang"] for _, e in batch])


@torch.no_grad()
def decode(lsm, entries, mode, args, rank, world, out_dir=None):
    """Translate this rank's run of the manifest's batches (shards.rank_batches). With out_dir, each batch's records
    are appended to this rank's partial file as soon as it is decoded, and batches already there (from an earlier,
    killed run) are not decoded again; returns nothing (read the merged result with shards.wait_for_partial). Without
    out_dir (--audio): gather -> records (manifest order) on every rank. A record is {index, id, src, reference,
    hypothesis, tgt_lang}, or {index, id, skipped: reason} for an entry whose audio could not be read (--skip-bad)."""
    batches, writer = shards.rank_batches(len(entries), args.batch_size, rank, world), None
    if out_dir is not None:
        batches = shards.undecoded(batches, out_dir, mode, args.skip_bad)
        writer = shards.PartialWriter(shards.partial_path(out_dir, mode, rank))
    indices = [i for b in batches for i in b]
    instructions = data.Instructions(args.instructions)
    if mode == "st":
        loader = speech_batches(lsm, entries, indices, args.batch_size, instructions, args.num_workers,
                                skip_bad=args.skip_bad)
    else:
        loader = text_batches(entries, indices, args.batch_size, instructions)
    records = []
    bar = tqdm(zip(batches, loader), total=len(batches), desc=f"decode {mode}", unit="batch", disable=rank != 0,
               file=sys.stderr)
    for batch_indices, batch in bar:
        hyps = []
        if not data.is_empty(batch):
            with autocast(lsm, args.dtype):
                hyps = lsm.generate(batch, mode=mode, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        out = hypothesis_records(entries, batch_indices, batch, hyps)
        if writer is not None:
            writer.write(out)
        else:
            records += out
    if writer is not None:
        writer.close()
        return None
    return sorted(shards.gather(records, world), key=lambda r: r["index"])


def hypothesis_records(entries, indices, batch, hyps):
    """The records of one decoded batch of entries[indices], in that order: the hypotheses of the items the batch
    holds (batch["ids"]), a "skipped" record for each item it dropped (unreadable audio, --skip-bad)."""
    kept, out = iter(zip(batch["ids"], hyps)), []
    skipped, truncated = set(batch.get("skipped", [])), set(batch.get("truncated", []))
    pending = next(kept, None)
    for i in indices:
        e = entries[i]
        if pending is not None and pending[0] == e["id"]:
            out.append(dict(index=i, id=e["id"], src=e["text"], reference=e["translation"],
                            hypothesis=pending[1].replace("\n", " "), tgt_lang=e["tgt_lang"],
                            **({"truncated": True} if e["id"] in truncated else {})))
            pending = next(kept, None)
        else:
            assert e["id"] in skipped, (e["id"], batch["ids"])  # no item may be dropped silently or reordered
            out.append(dict(index=i, id=e["id"], skipped="unreadable audio (--skip-bad)"))
    assert pending is None, pending
    return out

# ----------------------------------------------------------------------------- alignment degree


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


@torch.no_grad()
def representations(lsm, entries, pairs, layers, args, rank, world, pooled):
    """For the test pairs entries[pairs]: per pair, log W at each layer for the true pair and for a mismatched one
    (speech with the previous transcript of its batch), and (if `pooled`) the length-averaged layer-0 speech and
    text states. Speech states: model.speech_forward at the positions of --align-positions (model.alignment_mask:
    the real windows, or all the LLM saw); text: model.text_forward. -> records on every rank, in the order of
    `pairs`."""
    from model import alignment_mask, masked_mean
    own_pairs = [pairs[k] for k in shards.shard(len(pairs), rank, world)]
    instructions = data.Instructions(args.instructions)
    loader = speech_batches(lsm, entries, own_pairs, args.batch_size, instructions, args.num_workers)
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
            s0 = masked_mean(hs[0].float(), sm).cpu().numpy()
            t0 = masked_mean(text[0].float(), text_mask).cpu().numpy()
        for b in range(B):
            record = dict(index=own_pairs[k], log_w={l: matched[l][b] for l in layers},
                          log_w_mismatched={l: shifted[l][b] for l in layers})
            if pooled:
                record.update(speech0=s0[b], text0=t0[b])
            records.append(record)
            k += 1
    return shards.gather(records, world)


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

# ----------------------------------------------------------------------------- the evaluation, step by step


def read_entries(args):
    """--manifest (ST entries; errors name the file and line) or --audio files -> entries as data.read_manifest."""
    if args.audio:
        lang = data.normalize_lang(args.tgt_lang or "zh")
        return [dict(id=p, audio=p, task="st", text=None, translation=None, tgt_lang=lang, where=f"--audio {p}")
                for p in args.audio]
    try:
        entries = data.read_manifest(args.manifest)
    except ValueError as e:  # names the file and line
        raise UserError(str(e)) from None
    for e in entries:
        if e["task"] != "st":
            raise UserError(f"{e['where']}: task {e['task']!r}; evaluate.py scores speech translation (task 'st')")
        if e["text"] is None and ("mt" in args.mode or args.alignment or args.tsne):
            raise UserError(f"{e['where']}: no source transcript, which --mode mt, --alignment and --tsne need")
    if args.limit:
        entries = entries[:args.limit]
    if not entries:
        raise UserError(f"{args.manifest}: no entries")
    return entries


def run(args):
    """The model path: decode (--manifest or --audio), score, alignment degree, Figure 5; rank 0 writes and prints."""
    entries = read_entries(args)
    baselines = check_before_loading(args, entries)
    out_dir = None if args.audio else args.output_dir or default_output_dir(args.ckpt, args.manifest)
    with runtime.folder_lock(out_dir):  # one evaluation per folder: another would remove the partial files
        return evaluate_into(args, entries, baselines, out_dir)


def default_output_dir(ckpt, manifest):
    """<ckpt folder>/eval/<ckpt name>.<manifest name>-<8 hex digits of a hash of both absolute paths>: the name
    says what was evaluated, the hash keeps apart same-named manifests in different folders (zh/test.jsonl,
    ja/test.jsonl) and best/last checkpoints of one run."""
    stem = lambda path: os.path.splitext(os.path.basename(path))[0]
    key = hashlib.sha1("\n".join(map(os.path.abspath, (ckpt, manifest))).encode()).hexdigest()[:8]
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "eval", f"{stem(ckpt)}.{stem(manifest)}-{key}")


def evaluate_into(args, entries, baselines, out_dir):
    """run() in its output folder (None: --audio, stdout only)."""
    modes = [m for m in args.mode if m != "none"]
    with runtime.process_group(args.dist_timeout) as (rank, world, device):  # nccl on GPUs, gloo on CPUs
        if out_dir is not None:
            start_output_dir(args, entries, out_dir, modes, rank, world)
        lsm = load_model(args, device, verbose=rank == 0 and not args.audio)
        layers = alignment_layers(args, lsm)
        decoded = {mode: decode(lsm, entries, mode, args, rank, world, out_dir) for mode in modes}
        if out_dir is not None and modes:  # every rank: the closing barrier must not wait on any decoding
            decoded = shards.wait_for_partial(out_dir, modes, len(entries), args.skip_bad, wait=world > 1)
        reps = base_reps = None
        if layers:
            pairs = sample_pairs(entries, decoded, args)
            reps = representations(lsm, entries, pairs, layers, args, rank, world, pooled=bool(args.tsne))
        if args.tsne_base:  # Figure 5's first panel: the base model on the same pairs (one model in memory at once)
            del lsm
            base = load_model(argparse.Namespace(**{**vars(args), "ckpt": args.tsne_base}), device, verbose=False)
            base_reps = representations(base, entries, pairs, [0], args, rank, world, pooled=True)
    if rank != 0:
        return None
    if args.audio:
        for r in decoded["st"]:
            print(r["hypothesis"] if "hypothesis" in r else "")
        return decoded
    metrics = dict(name=args.name or os.path.relpath(args.ckpt), ckpt=args.ckpt, manifest=args.manifest,
                   n=len(entries), world_size=world, train=training_run(args.ckpt), bleu={}, skipped={}, truncated={})
    for mode, records in decoded.items():
        decoded[mode] = score_mode(metrics, mode, records, baselines.get(mode), args, out_dir)
    if args.alignment:
        add_alignment(metrics, reps, args.alignment)
    if args.tsne:
        add_figure5(metrics, reps, base_reps, args)
    return write_metrics(metrics, args, out_dir, decoded)


def check_before_loading(args, entries):
    """What can fail before any model loads: the checkpoint files, the BLEU tokenizers, the baseline's hypotheses
    (-> read_baselines' result), the plotting libraries of --tsne."""
    check_ckpt(args)
    if args.manifest and "none" not in args.mode:
        for lang in sorted({e["tgt_lang"] for e in entries}):
            check_tokenizer(bleu_tokenizer(lang, args.tokenize))
    baselines = read_baselines(args, entries)
    if args.tsne:
        results.plot_libs()
    return baselines


def start_output_dir(args, entries, out_dir, modes, rank, world):
    """--output-dir exists, without the temporary files a kill during write_atomic left, and with the partial
    hypotheses of an earlier run of the same settings (others are discarded: shards.prepare_partial)."""
    os.makedirs(out_dir, exist_ok=True)
    if rank == 0:
        runtime.clean_temporaries(out_dir, OWN_FILES)
    if modes:
        shards.prepare_partial(out_dir, decoding_config(args, entries), rank, world)


def decoding_config(args, entries):
    """What the hypotheses depend on: partial results are reused only if it is unchanged (--skip-bad is not part
    of it: a hypothesis does not depend on it; without it, entries an earlier run skipped are decoded again)."""
    def stamp(path):
        info = os.stat(path)
        return [os.path.abspath(path), info.st_size, int(info.st_mtime)]
    return dict(ckpt=stamp(args.ckpt), manifest=stamp(args.manifest), n=len(entries), num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, instructions=args.instructions,
                limit=args.limit, dtype=args.dtype,
                backbones={k: getattr(args, k) for k in BACKBONE_FLAGS})


def alignment_layers(args, lsm):
    """The LLM layers whose states --alignment and --tsne need, checked against the model now, not after hours of
    decoding."""
    layers = sorted(set(args.alignment or []) | ({0} if args.tsne else set()))
    if any(not 0 <= l <= lsm.n_layers for l in layers):
        raise UserError(f"--alignment {' '.join(map(str, args.alignment))}: the LLM has layers 0 (embeddings) "
                        f".. {lsm.n_layers}")
    return layers


def sample_pairs(entries, decoded, args):
    """--num-pairs manifest indices, sampled with --seed among the entries whose audio could be read."""
    skipped = {r["index"] for rs in decoded.values() for r in rs if "skipped" in r}
    pool = [i for i in range(len(entries)) if i not in skipped]
    return random.Random(args.seed).sample(pool, min(args.num_pairs, len(pool)))


def score_mode(metrics, mode, records, baseline, args, out_dir):
    """One mode's decoded records -> hyps.<mode>.jsonl, metrics["bleu"][mode] (with the paired bootstrap against
    `baseline`, (file, its records), if given) and the lists of skipped and truncated entries; the score lines on
    stdout. -> the records that have a hypothesis."""
    skipped = [r for r in records if "skipped" in r]
    truncated = [r["id"] for r in records if r.get("truncated")]
    if truncated:
        metrics["truncated"][mode] = truncated
        log(f"{len(truncated)} clip(s) longer than Whisper's input window were cut to it (listed in metrics.json)")
    records = [r for r in records if "skipped" not in r]
    write_atomic(os.path.join(out_dir, f"hyps.{mode}.jsonl"), "".join(
        json.dumps({k: r[k] for k in ("id", "src", "reference", "hypothesis", "tgt_lang")}, ensure_ascii=False)
        + "\n" for r in records))
    if skipped:
        metrics["skipped"][mode] = [r["id"] for r in skipped]
        log(f"--skip-bad: {len(skipped)} of {metrics['n']} entries have unreadable audio and are NOT in the {mode} "
            f"BLEU below: {[r['id'] for r in skipped][:10]}{' ...' if len(skipped) > 10 else ''} "
            f"(all listed in metrics.json)")
    if not records:
        raise UserError(f"{args.manifest}: no entry of --mode {mode} could be decoded (all skipped)")
    metrics["bleu"][mode] = score_records(records, args.tokenize)
    if baseline is not None:
        path, base = baseline
        add_paired(metrics["bleu"][mode], *common_segments(records, base, f"the {mode} hypotheses", path),
                   args.tokenize, source=path, whole_baseline=base)
    for lang, s in metrics["bleu"][mode].items():
        print(score_report(f"{mode.upper()} {lang}", s, len(skipped)))
    return records


def add_alignment(metrics, reps, layers):
    """metrics["alignment"]: the alignment degree per layer and its mean (summarize_alignment), printed."""
    a = metrics["alignment"] = summarize_alignment(reps, layers)
    print(f"alignment degree (mean log Wasserstein, {a['num_pairs']} pairs): "
          + ", ".join(f"layer {l} {results.fmt(v, 4)}" for l, v in a["log_w"].items())
          + f"; mean {results.fmt(a['mean'], 4)} (mismatched pairs {results.fmt(a['mismatched_mean'], 4)})")


def add_figure5(metrics, reps, base_reps, args):
    """Figure 5 (results.tsne_panels) of the length-averaged layer-0 states: --tsne-base's panel, then --ckpt's."""
    runs = ([(args.tsne_base_name, base_reps)] if args.tsne_base else []) + [(metrics["name"], reps)]
    panels = [(name, np.stack([r["speech0"] for r in rs]), np.stack([r["text0"] for r in rs])) for name, rs in runs]
    results.tsne_panels(panels, args.tsne, seed=args.seed)
    metrics["tsne"] = dict(path=args.tsne, num_pairs=len(reps), panels=[name for name, *_ in panels],
                           base_ckpt=args.tsne_base)
    print(f"Figure 5 (t-SNE of layer 0, {len(reps)} pairs; {' | '.join(n for n, *_ in panels)}): {args.tsne}")


def write_metrics(metrics, args, out_dir, decoded):
    """metrics.json (with the arguments; strict JSON), the partial files removed, the summary table on stdout.
    -> metrics with the records of every mode (for callers; not written)."""
    metrics["args"] = vars(args)
    metrics = finite_json(metrics)
    write_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1, ensure_ascii=False,
                                                                   allow_nan=False))
    shards.remove_partial(out_dir)
    print(f"\nhypotheses and metrics.json in {out_dir}\n")
    print(results.summary_table([metrics]))
    metrics["records"] = decoded
    return metrics


def training_run(ckpt):
    """What --table needs to know of the run that wrote `ckpt`: its seed and alignment, from the args.json that
    train.py writes next to the checkpoints (None where there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "args.json")
    try:
        with open(path, encoding="utf-8") as f:
            train_args = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(train_args, dict):
        return None
    return dict(args=path, **{k: train_args.get(k) for k in ("seed", "align", "layers", "layers_from")})


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

# ----------------------------------------------------------------------------- beyond the paper: significance
# against a baseline, scoring a hypotheses file


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
    them) in the same order. Else a UserError naming the first place where they differ."""
    for k, (a, b) in enumerate(zip(records, baseline)):
        wa, wb = a.get("where", f"{what}: segment {k + 1}"), b.get("where", f"{base_what}: segment {k + 1}")
        if a.get("id") is not None and b.get("id") is not None and a["id"] != b["id"]:
            raise UserError(f"{wa} has id {a['id']!r} but {wb} has id {b['id']!r}: a paired test needs the same "
                            f"segments in the same order")
        if lang_code(a["tgt_lang"]) != lang_code(b["tgt_lang"]):
            raise UserError(f"{wa} has target language {a['tgt_lang']!r} but {wb} has {b['tgt_lang']!r}: a paired "
                            f"test needs the same segments in the same order")
        if a["reference"] != b["reference"]:
            raise UserError(f"{wa} and {wb} have different references ({a['reference']!r} vs {b['reference']!r}): "
                            f"a paired test needs the same references in the same order")
    if len(records) != len(baseline):
        raise UserError(f"{what} has {len(records)} segments but {base_what} has {len(baseline)} (the first "
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
            raise UserError(f"{b['where']}: id {r['id']!r} is out of the order of {what}: a paired test needs the "
                            f"same segments in the same order")
        check_paired([r], [b], what, base_what)
        common.append((r, b))
        last = k
    if not common:
        raise UserError(f"{what} and {base_what} have no segment id in common: nothing to compare")
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
        raise UserError(f"--baseline-hyps {args.baseline_hyps}: a file holds one mode's hypotheses; for --mode "
                        f"{' '.join(modes)} give the baseline's evaluation folder (hyps.st.jsonl, hyps.mt.jsonl)")
    expected = [dict(id=e["id"], reference=e["translation"], tgt_lang=e["tgt_lang"], where=e["where"])
                for e in entries]
    out = {}
    for mode, path in paths.items():
        if not os.path.isfile(path):
            raise UserError(f"--baseline-hyps {args.baseline_hyps}: {path} not found (the baseline's hypotheses "
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
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object")
            for key in ("reference", "hypothesis"):
                if not isinstance(record.get(key), str):
                    raise UserError(f"{where}: {key!r} must be a string, got {record.get(key)!r}")
            lang = record.get("tgt_lang") or tgt_lang
            if not lang:
                raise UserError(f"{where}: no 'tgt_lang' in the line and no --tgt-lang given")
            if first is None:
                first = (lang_code(lang), n)
            elif one_language and lang_code(lang) != first[0]:
                raise UserError(f"{where}: tgt_lang {lang!r} differs from {first[0]!r} on line {first[1]}; "
                                f"score one target language per file")
            records.append(dict(record, tgt_lang=lang, where=where))
    if not records:
        raise UserError(f"{path}: no hypotheses")
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

# ----------------------------------------------------------------------------- command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runtime.HelpFormatter)
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
    for name in BACKBONE_FLAGS:
        config.add_model_flag(g, name, default=None)
    g.add_argument("--dtype", choices=list(config.DTYPES),
                   help="autocast dtype of the forwards, as training's --dtype (default: the LLM's dtype; float32 = "
                        "no autocast)")
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", nargs="+", choices=["st", "mt", "none"], default=["st"],
                   help="st: speech in; mt: the transcript in place of the speech, same prompt (Table 5); "
                        "none: no decoding (only --alignment / --tsne)")
    g.add_argument("--num-beams", type=runtime.POSITIVE_INT, default=4, help="beam size (1 = greedy); SALMONN: 4")
    g.add_argument("--max-new-tokens", type=runtime.POSITIVE_INT, default=200, help="SALMONN: 200")
    g.add_argument("--batch-size", type=runtime.POSITIVE_INT, default=8, help="utterances per batch and process")
    g.add_argument("--num-workers", type=runtime.COUNT, default=2, help="DataLoader workers reading audio")
    g.add_argument("--instructions", help="JSON file of instructions: this project's format or SALMONN's "
                                          "prompts/test_prompt.json (data.Instructions; a list: one per item, seeded "
                                          "by its index); default: 'Translate the speech into <language>.'")
    g.add_argument("--limit", type=runtime.POSITIVE_INT, help="evaluate only the first N entries of the manifest")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out entries whose audio cannot be read (missing, undecodable, NaN/Inf samples) instead "
                        "of stopping: listed in metrics.json under 'skipped', BLEU over the rest")
    g.add_argument("--dist-timeout", type=runtime.POSITIVE, default=60.0, metavar="MINUTES",
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
    g.add_argument("--alignment", nargs="+", type=runtime.COUNT, metavar="LAYER",
                   help="alignment degree at these LLM layers (0 = embeddings), e.g. 0 1 (the paper's selection)")
    g.add_argument("--tsne", metavar="FILE.png", help="Figure 5: t-SNE of layer-0 speech and text states")
    g.add_argument("--tsne-base", metavar="CKPT", help="Figure 5's first panel: the base model's checkpoint, drawn on "
                                                      "the same pairs with the same settings and axes")
    g.add_argument("--tsne-base-name", default="base", help="title of the --tsne-base panel")
    g.add_argument("--num-pairs", type=runtime.POSITIVE_INT, default=1000, help="test pairs for --alignment and --tsne (paper: 1000)")
    g.add_argument("--seed", type=runtime.COUNT, default=0, help="sampling of the pairs; t-SNE")
    config.add_alignment_args(g)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="hyps.*.jsonl and metrics.json (default: <ckpt folder>/eval/<ckpt name>."
                                        "<manifest name>-<hash of both paths>; printed at the end)")
    g.add_argument("--name", help="row name in the summary table (default: the --ckpt path); runs of one system "
                                  "over several seeds share it")
    g.add_argument("--fig6", metavar="FILE.png", help="with --table: Figure 6, ST BLEU against the alignment degree "
                                                      "of the runs (mean ± sd per system over its seeds)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    chosen = [f for f in ("manifest", "audio", "hyps", "table", "mrr") if getattr(args, f)]
    if args.tgt_lang is not None:
        try:
            data.normalize_lang(args.tgt_lang)
        except ValueError as err:
            p.error(f"argument --tgt-lang: {err}")
    for name in ("hyps", "baseline", "mrr", "manifest", "ckpt", "tsne_base"):
        if getattr(args, name) and os.path.isdir(getattr(args, name)):
            p.error(f"argument {runtime.flag(name)}: {getattr(args, name)} is a folder; expected a file")
    if len(chosen) != 1:
        p.error(f"give exactly one of --manifest, --audio, --hyps, --table, --mrr (got {', '.join(chosen) or 'none'})")
    for flag, needs in (("baseline", "hyps"), ("baseline_hyps", "manifest"), ("fig6", "table"), ("tsne_base", "tsne")):
        if getattr(args, flag) and not getattr(args, needs):
            p.error(f"--{flag.replace('_', '-')} goes with --{needs}")
    if args.mrr:
        print(results.mrr_table(args.mrr))
        return None
    if args.table:
        return print_table(args)
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
    runtime.distinct(p, "alignment", args.alignment)
    try:
        args.instructions_used = data.Instructions(args.instructions).describe()  # recorded in metrics.json
    except ValueError as e:  # names the file
        raise UserError(f"--instructions {e}") from None
    return run(args)


def print_table(args):
    """--table [--fig6]: the summary table of the metrics.json files (and Figure 6) -> their contents."""
    runs = results.read_all_metrics(args.table)
    if args.fig6:
        results.plot_libs()
    print(results.summary_table(runs))
    if args.fig6:
        results.figure6(runs, args.table, args.fig6)
        n = len(results.group_runs(runs))
        print(f"\nFigure 6 (ST BLEU against the alignment degree, {n} systems): {args.fig6}")
    return runs


if __name__ == "__main__":
    runtime.cli(main, "evaluate.py")
