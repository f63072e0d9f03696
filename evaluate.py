"""Evaluate a trained AI-STA model: SacreBLEU on speech translation (ST) and on zero-shot text translation (MT),
the alignment degree of speech and text states, and the t-SNE picture of the embedding layer.

The paper's measurements (CoVoST 2 test manifests from prepare_data.py, checkpoints from the stage scripts):

    Table 2, 3, 4 (ST BLEU)   python evaluate.py --ckpt runs/stage3/best.safetensors --manifest covost/test.en_zh.jsonl
    Table 5 (ST and MT BLEU)  python evaluate.py --ckpt ... --manifest ... --mode st mt
    Figure 6 (alignment)      python evaluate.py --ckpt ... --manifest ... --alignment 0 1 --num-pairs 1000
    Figure 5 (t-SNE)          python evaluate.py --ckpt ... --manifest ... --tsne fig5.png --num-pairs 1000
    one table, several runs   python evaluate.py --table base/eval/test/metrics.json sta/eval/test/metrics.json
    score a hypotheses file   python evaluate.py --hyps hyps.st.jsonl [--tgt-lang zh]     (no model is loaded)
    translate a few files     python evaluate.py --ckpt ... --audio a.wav b.flac --tgt-lang ja
    on 8 GPUs                 torchrun --nproc_per_node 8 evaluate.py --ckpt ... --manifest ...

BLEU: SacreBLEU corpus BLEU (one reference, case-sensitive) with the tokenizer of the target language:
zh -> "zh" (characters for CJK; 13a on Chinese gives near-zero BLEU), ja -> "ja-mecab" (needs
`pip install "sacrebleu[ja]"`: mecab-python3 + ipadic), any other -> "13a"; printed with its signature.
MT mode (the paper's Table 5) puts the transcript's token embeddings where the speech tokens go, with the same
template and instruction as ST (the paper: "the inference prompt is identical to the training prompt"); no audio
is read.

Alignment degree (paper section 6.5, Figure 6). For N test pairs (speech_i, transcript_i), sampled with --seed,
the speech goes through the LSM as in training and the transcript goes in its place (same template and
instruction, model.text_forward). At layer l, with h^s the states at the speech windows that overlap real audio
and h^t the states at the transcript's tokens:

    A_l = 1/N sum_i log W(h^s_{i,l}, h^t_{i,l}),    W = ot.wasserstein (entropic estimate of eq. 1)

and the reported degree is the mean of A_l over the given layers (the paper uses its selected layers, 0 and 1).
Lower = better aligned. For scale, the same mean over mismatched pairs (speech_i with the transcript of
another utterance of its batch) is reported too: the level of "no alignment" for this model and layer.

Figure 5: speech (layer 0 = projector output, real windows) and text (layer 0 = token embeddings) states, each
averaged over its length, for the same N pairs; t-SNE to 2-D (scikit-learn) and a kernel-density contour per
modality (scipy), saved as PNG (matplotlib). These three libraries are optional: only --tsne needs them.

Sharding: under torchrun every rank decodes a contiguous slice of the manifest (a batch is the same in any run
when the slices are multiples of --batch-size, so hypotheses do not depend on the number of processes) and rank 0
gathers the results (all_gather_object), puts them back in manifest order, scores and writes. CPU: gloo; GPU: nccl.

Outputs of rank 0 in --output-dir: hyps.st.jsonl / hyps.mt.jsonl (manifest order; id, src, reference,
hypothesis, tgt_lang), metrics.json (BLEU with signature per mode and language, alignment, arguments); on
stdout the BLEU lines and a summary table in the form of the paper's tables (Markdown).
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import ot

TOKENIZE_BY_LANG = {"zh": "zh", "ja": "ja-mecab"}  # every other target language: "13a"
DEFAULT_TOKENIZE = "13a"
JA_INSTALL = 'pip install "sacrebleu[ja]"'
FIG_INCHES, FIG_DPI = (6.0, 5.0), 100  # --tsne: a 600 x 500 pixel PNG


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


def score_records(records, tokenize=None):
    """Records with reference, hypothesis, tgt_lang -> {lang: dict(score, signature, n, line)}, one corpus BLEU
    per target language (languages in order of first appearance)."""
    by_lang = {}
    for r in records:
        by_lang.setdefault(lang_code(r["tgt_lang"]), []).append(r)
    out = {}
    for lang, rs in by_lang.items():
        score, sig = corpus_bleu([r["hypothesis"] for r in rs], [r["reference"] for r in rs],
                                 bleu_tokenizer(lang, tokenize))
        out[lang] = dict(score=score.score, signature=sig, n=len(rs), line=str(score))
    return out


def read_hyps(path, tgt_lang=None):
    """A hypotheses file (JSON lines with 'reference', 'hypothesis' and 'tgt_lang', or --tgt-lang for lines without
    one) -> list of records. Errors name the file and line. One target language per file (one BLEU)."""
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
            elif lang_code(lang) != first[0]:
                raise EvalError(f"{where}: tgt_lang {lang!r} differs from {first[0]!r} on line {first[1]}; "
                                f"score one target language per file")
            records.append(dict(rec, tgt_lang=lang))
    if not records:
        raise EvalError(f"{path}: no hypotheses")
    return records


def score_hyps_file(args):
    """--hyps: score a file without any model; the last line of stdout is {"bleu": ..., "signature": ...}."""
    records = read_hyps(args.hyps, args.tgt_lang)
    tokenize = bleu_tokenizer(records[0]["tgt_lang"], args.tokenize)
    check_tokenizer(tokenize)
    (lang, s), = score_records(records, args.tokenize).items()
    print(f"{args.hyps}: {s['n']} segments, target {lang}: {s['line']}")
    print(f"signature: {s['signature']}")
    print(json.dumps({"bleu": s["score"], "signature": s["signature"]}, ensure_ascii=False))
    return s

# ----------------------------------------------------------------------------- ranks


def init_distributed():
    """torchrun (WORLD_SIZE > 1) -> process group (nccl on GPU, gloo on CPU). Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)  # before init: nccl's all_gather_object uses the current device
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local) if cuda else torch.device("cpu")


def shard(n, rank, world):
    """Contiguous slice of range(n) for `rank`; slices differ in size by at most 1 and cover range(n) in rank order."""
    return list(range(rank * n // world, (rank + 1) * n // world))


def gather(local, world):
    """Each rank's list -> the concatenation of all of them in rank order (on every rank)."""
    if world == 1:
        return list(local)
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]

# ----------------------------------------------------------------------------- model and batches


def load_model(args, device, verbose):
    """LSM.from_trainable(--ckpt): base checkpoints from CKPT.json unless --whisper/--beats/--llm/--llm-dtype say."""
    from model import LSM  # imported here: --hyps and --table need no torch model stack (transformers, peft)
    if not os.path.isfile(args.ckpt) or not os.path.isfile(args.ckpt + ".json"):
        raise EvalError(f"--ckpt {args.ckpt}: expected the trainable weights there and their build arguments in "
                        f"{args.ckpt}.json (both written by LSM.save_trainable)")
    overrides = {k: getattr(args, k) for k in ("whisper", "beats", "llm", "llm_dtype") if getattr(args, k) is not None}
    lsm = LSM.from_trainable(args.ckpt, verbose=verbose, **overrides)
    return lsm.to(device).eval()


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def autocast(lsm, dtype=None):
    """The precision of the forwards, as training's --dtype: autocast in `dtype` (--dtype; None: the LLM's dtype, so
    a bf16 LLM is evaluated as the default --dtype bfloat16 trained it) on any device; float32: no autocast.
    BEATs' fbank stays in float32 under any autocast (beats.BEATs.preprocess): float16 would overflow there."""
    dtype = AUTOCAST_DTYPES[dtype] if dtype else lsm.llm.get_input_embeddings().weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(lsm.device.type, dtype=dtype)
    return contextlib.nullcontext()


def speech_batches(lsm, entries, indices, batch_size, instructions, num_workers):
    """Collated speech batches (data.py) of entries[indices], in that order. The dataset holds all entries so the
    instruction of item i is keyed by its manifest index, the same on every rank."""
    from torch.utils.data import DataLoader, Subset
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"])
    ds = Subset(data.SpeechDataset(entries, instructions), indices)
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


@torch.no_grad()
def decode(lsm, entries, mode, args, rank, world):
    """Translate this rank's shard of `entries`, gather -> records (manifest order) on every rank."""
    indices = shard(len(entries), rank, world)
    instructions = data.Instructions(args.instructions)
    if mode == "st":
        batches = speech_batches(lsm, entries, indices, args.batch_size, instructions, args.num_workers)
    else:
        batches = text_batches(entries, indices, args.batch_size, instructions)
    records, k = [], 0
    bar = tqdm(batches, total=math.ceil(len(indices) / args.batch_size), desc=f"decode {mode}", unit="batch",
               disable=rank != 0, file=sys.stderr)
    for batch in bar:
        with autocast(lsm, args.dtype):
            hyps = lsm.generate(batch, mode=mode, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        for utt_id, hyp in zip(batch["ids"], hyps):
            i = indices[k]
            e = entries[i]
            assert utt_id == e["id"], (utt_id, e["id"])  # no item may be dropped or reordered
            records.append(dict(index=i, id=e["id"], src=e["text"], reference=e["translation"],
                                hypothesis=hyp.replace("\n", " "), tgt_lang=e["tgt_lang"]))
            k += 1
    return sorted(gather(records, world), key=lambda r: r["index"])

# ----------------------------------------------------------------------------- alignment degree and Figure 5


def log_wasserstein(speech, speech_mask, text, text_mask, *, shift=0, eps=ot.EPS, n_iters=ot.N_ITERS):
    """log W(speech_i, text_{(i - shift) mod B}) per pair -> (B,) float32. speech (B, n, d), speech_mask (B, n),
    text (B, m, d), text_mask (B, m), masks True = valid. shift = 0: the true pairs; shift = 1: each speech with
    the previous utterance's text (mismatched pairs). W is clamped at the smallest positive float: the log stays
    finite even for identical point clouds."""
    text, text_mask = text.roll(shift, 0), text_mask.roll(shift, 0)
    w = ot.wasserstein(speech.float(), text.float(), speech_mask, text_mask, eps=eps, n_iters=n_iters)
    return w.clamp(min=torch.finfo(w.dtype).tiny).log()


def alignment_degree(speech, speech_mask, text, text_mask, *, shift=0, eps=ot.EPS, n_iters=ot.N_ITERS):
    """The paper's alignment degree at one layer for one batch of states: mean_i log W(speech_i, text_i)
    (with `shift`, of mismatched pairs). Arguments as log_wasserstein."""
    return log_wasserstein(speech, speech_mask, text, text_mask, shift=shift, eps=eps, n_iters=n_iters).mean().item()


def length_mean(h, mask):
    """(B, n, d), (B, n) -> (B, d): the mean over the valid positions (Figure 5's length-averaged states)."""
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.no_grad()
def representations(lsm, entries, pairs, layers, args, rank, world, pooled):
    """For the test pairs entries[pairs]: per pair, log W at each layer for the true pair and for a mismatched one
    (speech with the previous transcript of its batch), and (if `pooled`) the length-averaged layer-0 speech and
    text states. Speech states: model.speech_forward (real windows); text: model.text_forward. -> records on every
    rank, in the order of `pairs`."""
    mine = [pairs[k] for k in shard(len(pairs), rank, world)]
    instructions = data.Instructions(args.instructions)
    loader = speech_batches(lsm, entries, mine, args.batch_size, instructions, args.num_workers)
    records, k = [], 0
    for batch in tqdm(loader, desc="speech/text states", unit="batch", disable=rank != 0, file=sys.stderr):
        with autocast(lsm, args.dtype):
            out = lsm.speech_forward(batch, layers)
            text, text_mask = lsm.text_forward(batch["transcripts"], batch["instructions"], layers)
        hs, sm = out["hidden"], out["speech_mask"].to(lsm.device)
        kw = dict(eps=args.ot_eps, n_iters=args.ot_iters)
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
    """The optional libraries of --tsne, or an error saying what to install."""
    try:
        from matplotlib.figure import Figure
        from scipy.stats import gaussian_kde
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise EvalError(f"--tsne needs scikit-learn, scipy and matplotlib ({e}): "
                        f"pip install scikit-learn matplotlib") from None
    return Figure, gaussian_kde, TSNE


def tsne_figure(speech, text, path, seed=0, title=""):
    """The paper's Figure 5 for one model: speech (N, d) and text (N, d) vectors -> t-SNE of the 2N points to 2-D,
    a scatter and a Gaussian kernel-density contour per modality -> PNG of FIG_INCHES at FIG_DPI. Returns the
    (2N, 2) embedding (speech rows first)."""
    Figure, gaussian_kde, TSNE = _plot_libs()
    speech, text = np.asarray(speech, np.float64), np.asarray(text, np.float64)
    x = np.concatenate([speech, text])
    if len(speech) < 3:
        raise EvalError(f"--tsne needs at least 3 pairs, got {len(speech)}")
    perplexity = min(30.0, (len(x) - 1) / 3)  # sklearn's default 30 must stay below the number of points
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    lo, hi = xy.min(0), xy.max(0)
    pad = 0.15 * (hi - lo + 1e-9)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 120),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], 120))
    fig = Figure(figsize=FIG_INCHES, dpi=FIG_DPI)
    ax = fig.subplots()
    n = len(speech)
    for pts, name, color, cmap in ((xy[:n], "speech", "tab:blue", "Blues"), (xy[n:], "text", "tab:red", "Reds")):
        try:
            density = gaussian_kde(pts.T)(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
            ax.contour(gx, gy, density, levels=6, cmap=cmap, linewidths=1.0)
        except (np.linalg.LinAlgError, ValueError) as e:  # e.g. points on a line: no 2-D density
            log(f"--tsne: no density contour for {name} ({e})")
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=color, alpha=0.6, label=f"{name} ({n})")
    ax.set_title(f"t-SNE of length-averaged layer-0 states{': ' + title if title else ''}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=FIG_DPI)
    return xy

# ----------------------------------------------------------------------------- summary table


def summary_table(runs):
    """Metrics dicts (one per model) -> a Markdown table in the form of the paper's tables: one row per model,
    BLEU per mode and target language (Tables 2-5) and the alignment degree (log W per layer, mean, and the
    mismatched-pair level; Figure 6)."""
    cols = []  # (header, getter), in order of first appearance
    def add(header, get):
        if header not in [h for h, _ in cols]:
            cols.append((header, get))
    for m in runs:
        for mode in ("st", "mt"):
            for lang in m.get("bleu", {}).get(mode, {}):
                add(f"{mode.upper()} {lang}",
                    lambda r, mode=mode, lang=lang: _fmt(r.get("bleu", {}).get(mode, {}).get(lang, {}).get("score"), 1))
        if m.get("alignment"):
            for l in m["alignment"]["layers"]:
                add(f"log W L{l}", lambda r, l=str(l): _fmt(r.get("alignment", {}).get("log_w", {}).get(l), 3))
    if any(m.get("alignment") for m in runs):
        add("log W mean", lambda r: _fmt(r.get("alignment", {}).get("mean"), 3))
        add("mismatched", lambda r: _fmt(r.get("alignment", {}).get("mismatched_mean"), 3))
    header = ["Model"] + [h for h, _ in cols]
    rows = [[m.get("name", "?")] + [get(m) for _, get in cols] for m in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _fmt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"

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
    if args.manifest and "none" not in args.mode:  # fail before any decoding
        for lang in sorted({e["tgt_lang"] for e in entries}):
            check_tokenizer(bleu_tokenizer(lang, args.tokenize))
    if args.tsne:
        _plot_libs()
    rank, world, device = init_distributed()
    try:
        lsm = load_model(args, device, verbose=rank == 0 and not args.audio)
        layers = sorted(set(args.alignment or []) | ({0} if args.tsne else set()))
        if any(not 0 <= l <= lsm.n_layers for l in layers):  # say so now, not after hours of decoding
            raise EvalError(f"--alignment {' '.join(map(str, args.alignment))}: the LLM has layers 0 (embeddings) "
                            f".. {lsm.n_layers}")
        results = {mode: decode(lsm, entries, mode, args, rank, world) for mode in args.mode if mode != "none"}
        reps = None
        if layers:
            pairs = random.Random(args.seed).sample(range(len(entries)), min(args.num_pairs, len(entries)))
            reps = representations(lsm, entries, pairs, layers, args, rank, world, pooled=bool(args.tsne))
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return None
    if args.audio:
        for r in results["st"]:
            print(r["hypothesis"])
        return results

    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval",
                                              os.path.splitext(os.path.basename(args.manifest))[0])
    os.makedirs(out_dir, exist_ok=True)
    metrics = dict(name=args.name or os.path.relpath(args.ckpt), ckpt=args.ckpt, manifest=args.manifest,
                   n=len(entries), world_size=world, bleu={})
    for mode, records in results.items():
        with open(os.path.join(out_dir, f"hyps.{mode}.jsonl"), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({k: r[k] for k in ("id", "src", "reference", "hypothesis", "tgt_lang")},
                                   ensure_ascii=False) + "\n")
        metrics["bleu"][mode] = score_records(records, args.tokenize)
        for lang, s in metrics["bleu"][mode].items():
            print(f"{mode.upper()} {lang} ({s['n']} segments): {s['line']}\n    signature: {s['signature']}")
    if args.alignment:
        metrics["alignment"] = summarize_alignment(reps, args.alignment)
        a = metrics["alignment"]
        print(f"alignment degree (mean log Wasserstein, {a['num_pairs']} pairs): "
              + ", ".join(f"layer {l} {_fmt(v, 4)}" for l, v in a["log_w"].items())
              + f"; mean {_fmt(a['mean'], 4)} (mismatched pairs {_fmt(a['mismatched_mean'], 4)})")
    if args.tsne:
        tsne_figure(np.stack([r["speech0"] for r in reps]), np.stack([r["text0"] for r in reps]), args.tsne,
                    seed=args.seed, title=metrics["name"])
        metrics["tsne"] = dict(path=args.tsne, num_pairs=len(reps))
        print(f"Figure 5 (t-SNE of layer 0, {len(reps)} pairs): {args.tsne}")
    metrics["args"] = vars(args)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1, ensure_ascii=False)
    print(f"\nhypotheses and metrics.json in {out_dir}\n")
    print(summary_table([metrics]))
    metrics["records"] = results  # for callers (tests); not written
    return metrics


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    g = p.add_argument_group("what to evaluate (one of --manifest, --audio, --hyps, --table)")
    g.add_argument("--ckpt", help="trainable state (LSM.save_trainable), e.g. runs/stage3/best.safetensors; "
                                  "its .json sidecar names the base checkpoints")
    g.add_argument("--manifest", help="test manifest (JSON lines, task st; data.py format)")
    g.add_argument("--audio", nargs="+", metavar="FILE", help="translate these audio files; one line each on stdout")
    g.add_argument("--hyps", metavar="FILE", help="score a hypotheses file (JSON lines: reference, hypothesis, "
                                                  "tgt_lang); no model; last stdout line is JSON")
    g.add_argument("--table", nargs="+", metavar="METRICS", help="print the summary table of these metrics.json files")
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
    g.add_argument("--instructions", help="JSON file of alternative instructions (data.Instructions); "
                                          "default: 'Translate the speech into <language>.'")
    g.add_argument("--limit", type=int, help="evaluate only the first N entries of the manifest")
    g = p.add_argument_group("BLEU")
    g.add_argument("--tokenize", help="SacreBLEU tokenizer for every language (default: zh -> zh, ja -> ja-mecab, "
                                      "else 13a)")
    g.add_argument("--tgt-lang", help="target language of --audio (default zh) and of --hyps lines without tgt_lang")
    g = p.add_argument_group("representations (paper Figures 5 and 6)")
    g.add_argument("--alignment", nargs="+", type=int, metavar="LAYER",
                   help="alignment degree at these LLM layers (0 = embeddings), e.g. 0 1 (the paper's selection)")
    g.add_argument("--tsne", metavar="FILE.png", help="Figure 5: t-SNE of layer-0 speech and text states")
    g.add_argument("--num-pairs", type=int, default=1000, help="test pairs for --alignment and --tsne (paper: 1000)")
    g.add_argument("--seed", type=int, default=0, help="sampling of the pairs; t-SNE")
    g.add_argument("--ot-eps", type=float, default=ot.EPS, help="relative entropic epsilon of ot.wasserstein")
    g.add_argument("--ot-iters", type=int, default=ot.N_ITERS, help="Sinkhorn iterations")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="hyps.*.jsonl and metrics.json (default: <ckpt folder>/eval/<manifest name>)")
    g.add_argument("--name", help="row name in the summary table (default: the --ckpt path)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    chosen = [f for f in ("manifest", "audio", "hyps", "table") if getattr(args, f)]
    if len(chosen) != 1:
        p.error(f"give exactly one of --manifest, --audio, --hyps, --table (got {', '.join(chosen) or 'none'})")
    if args.table:
        runs = []
        for path in args.table:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        print(summary_table(runs))
        return runs
    if args.hyps:
        return score_hyps_file(args)
    if not args.ckpt:
        p.error("--manifest and --audio need --ckpt")
    if "none" in args.mode and (len(args.mode) > 1 or not (args.alignment or args.tsne)):
        p.error("--mode none goes alone, with --alignment and/or --tsne")
    if args.audio and (args.mode != ["st"] or args.alignment or args.tsne):
        p.error("--audio only translates speech: no --mode mt, --alignment or --tsne (they need transcripts)")
    for flag in ("num_beams", "max_new_tokens", "batch_size", "num_pairs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except (EvalError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: error: {e}")
