"""Stage 2 of AI-STA (paper section 4.2): choose the LLM layers to align, by speech-to-text retrieval.

With the stage-1 model, N random speech-text pairs (paper: 1000 from LibriSpeech test-clean, --num-pairs,
seeded) go through the LLM twice with the same instruction: the speech (states at the speech positions:
--align-positions real, the default, only the windows that overlap real audio; all, every speech position the
LLM saw -- the same with --speech-tokens real) and the transcript in place of the speech (states at the
transcript positions). For every layer l = 0 (embeddings) .. L, with h^s_{i,l} / h^t_{j,l} the states of speech i /
text j (eq. 3):

    D^(l)_ij = W(h^s_{i,l}, h^t_{j,l})                 (ot.pairwise_wasserstein, N x N; --ot-cost, see joint_train)
    r_i      = rank of the true text i among all N texts by D^(l)_i.  (1 = closest; ties count against it)
    MRR^(l)  = 1/N sum_i 1 / r_i                                                    (eq. 4)
    I        = { l : MRR^(l) > threshold }                                          (eq. 5, threshold 0.05)

Chance level. If a layer's states carried no information about the pairing, every r_i would be uniform on 1..N
and independent over i, so
    E[MRR] = H_N / N,   sd[MRR] = sqrt((H2_N / N - (H_N / N)^2) / N),   H_N = sum_{r<=N} 1/r, H2_N = sum 1/r^2
(N = 1000: 0.0075 +- 0.0013; N = 100: 0.052, already above the paper's 0.05; N = 1: exactly 1). Where
chance + 3 sd reaches the threshold, a layer without any alignment is likely to be selected: the script
refuses before loading the model unless --allow-chance-level, and prints the chance level beside the table.
Non-finite distances (NaN states) are refused, naming the pairs: a NaN row would otherwise rank every text first.

Output (--output-dir): layers.json {"mrr": {layer: MRR}, "selected": I, "threshold", "num_pairs", "chance":
{"mrr", "sd"}, "counts" (unreadable clips skipped, clips cut to Whisper's window), "skipped" (their ids), "args"}
(joint_train.py --layers-from reads "selected"), mrr_per_layer.png (paper Figure 4; needs matplotlib), and
the table on stdout. The 2N forwards keep every layer's states in CPU memory (real positions only, in the
LLM's dtype), so N = 1000 x 29 layers of a 7B model fit; the N x N problems of a layer run on --device in
blocks with a progress bar.

    python select_layers.py --init runs/stage1/last.safetensors --manifest data/librispeech_test_clean.jsonl \\
        --output-dir runs/stage2
"""
import argparse
import json
import os
import random

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import config
import data
import model as M
import ot
import runtime
from results import chance_mrr  # (mean, sd) of the MRR of random rankings: the module docstring


# ----------------------------------------------------------------------------- retrieval metric (pure)


def ranks(D):
    """D (N, N) distances, speech i vs text j, true pairs on the diagonal -> (N,) long ranks r_i >= 1:
    r_i = 1 + #{j != i : D_ij <= D_ii} (a tie with a wrong text counts as ranked above the true one)."""
    true = D.diagonal()[:, None]
    others = ~torch.eye(len(D), dtype=torch.bool, device=D.device)
    return 1 + ((D <= true) & others).sum(1)


def mean_reciprocal_rank(D):
    """Eq. 4: MRR = 1/Q sum_i 1 / r_i."""
    return (1.0 / ranks(D).double()).mean().item()


def chance_within_reach(n, threshold, sds=3.0):
    """True when chance-level MRR + `sds` standard deviations reaches the threshold (selection meaningless)."""
    mean, sd = chance_mrr(n)
    return mean + sds * sd >= threshold


def pairs_needed(threshold, sds=3.0, limit=10 ** 6):
    """The smallest N for which chance level stays clear of the threshold (None if none up to `limit`)."""
    n = 2
    while n <= limit and chance_within_reach(n, threshold, sds):
        n = n * 2 if chance_within_reach(2 * n, threshold, sds) else n + 1
    return n if n <= limit else None


def select(mrr, threshold):
    """Eq. 5: the layers whose MRR is above the threshold, in increasing order."""
    return sorted(l for l, v in mrr.items() if v > threshold)


def pad(states):
    """list of (n_i, d) -> (N, max n, d) float32, mask (N, max n) bool."""
    n = max(len(s) for s in states)
    x = torch.zeros(len(states), n, states[0].shape[-1])
    mask = torch.zeros(len(states), n, dtype=torch.bool)
    for i, s in enumerate(states):
        x[i, :len(s)], mask[i, :len(s)] = s.float(), True
    return x, mask


def layer_mrrs(speech, text, *, eps=ot.EPS, n_iters=ot.N_ITERS, chunk_size=4096, rows=32, device="cpu",
               cost="sqeuclidean", ids=None):
    """speech / text: {layer: list of N tensors (n_i, d) / (m_i, d)} (pair i = speech i, text i)
    -> {layer: MRR} (eq. 3-4). D^(l) is computed in blocks of `rows` speech rows on `device`, with the ground cost
    `cost` (model.cost_points: sqeuclidean or cosine). A non-finite distance raises data.UserError naming the layer and
    the pairs (ids[i], or the index i) involved."""
    out = {}
    name = lambda idx: [ids[i] if ids is not None else i for i in idx[:10]] + (["..."] if len(idx) > 10 else [])
    for l in sorted(speech):
        for side, states in (("speech", speech[l]), ("transcript", text[l])):
            bad = [i for i, h in enumerate(states) if not torch.isfinite(h).all()]
            if bad:
                raise data.UserError(f"layer {l}: the {side} states of {len(bad)} pair(s) are not finite (NaN/Inf), "
                                     f"pairs {name(bad)}: refusing to rank their distances")
        x, xm = pad(speech[l])
        y, ym = (t.to(device) for t in pad(text[l]))
        x, y, scale = M.cost_points(x, y, cost)  # scale: 1, or 1/2 for cosine (it does not change a ranking)
        D = torch.empty(len(x), len(y), dtype=torch.float64)
        for i in tqdm(range(0, len(x), rows), desc=f"layer {l} distances", leave=False):
            D[i:i + rows] = ot.pairwise_wasserstein(x[i:i + rows].to(device), y, xm[i:i + rows].to(device), ym,
                                                    eps=eps, n_iters=n_iters,
                                                    chunk_size=chunk_size).double().cpu() * scale
        bad = ~torch.isfinite(D)
        if bad.any():
            bad_rows = torch.nonzero(bad.any(1)).flatten().tolist()
            raise data.UserError(f"layer {l}: {int(bad.sum())} of {D.numel()} distances are not finite (rows of the "
                                 f"pairs {name(bad_rows)}): refusing to rank them")
        out[l] = mean_reciprocal_rank(D)
    return out


# ----------------------------------------------------------------------------- hidden states


@torch.no_grad()
def collect_states(lsm, loader, layers, autocast, positions="real"):
    """Run every batch through speech_forward and text_forward (same instruction). Returns
    ({l: [speech states at the aligned positions (n_i, d)]}, {l: [transcript states (m_i, d)]}, {"ids", "counts",
    "skipped"} of the pairs read) on the CPU; the positions: model.alignment_mask(out, positions) (real windows, or
    all the LLM saw). The speech
    forward also sees the target after the instruction; by causality the states at the speech positions do not
    depend on it."""
    speech, text = {l: [] for l in layers}, {l: [] for l in layers}
    ids, counts, skipped = [], {"bad_audio": 0, "truncated": 0}, []
    for batch in tqdm(loader, desc="forwards"):
        for key, n in data.batch_counts(batch).items():
            counts[key] = counts.get(key, 0) + n
        skipped += (batch or {}).get("skipped", [])
        if data.is_empty(batch):
            continue
        ids += batch["ids"]
        with autocast():
            out = lsm.speech_forward(batch, layers)
            hid_t, mask_t = lsm.text_forward(batch["transcripts"], batch["instructions"], layers)
        n_s, n_t = M.alignment_mask(out, positions).sum(1).tolist(), mask_t.sum(1).tolist()
        for l in layers:  # aligned speech positions / transcript tokens are a prefix of each row
            speech[l] += [h[:n].cpu() for h, n in zip(out["hidden"][l], n_s)]
            text[l] += [h[:n].cpu() for h, n in zip(hid_t[l], n_t)]
    return speech, text, dict(ids=ids, counts=counts, skipped=skipped)


# ----------------------------------------------------------------------------- output


def plot(mrr, threshold, path, title, chance=None):
    """MRR per layer with the threshold, like the paper's Figure 4, and the chance level (mean, sd) of random
    rankings if given (the level below which a layer's MRR says nothing). Returns False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return False
    layers = sorted(mrr)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, [mrr[l] for l in layers], marker="o", label="MRR")
    ax.axhline(threshold, color="gray", linestyle="--", label=f"threshold {threshold}")
    if chance is not None:
        ax.axhline(chance[0], color="tab:red", linestyle=":", label=f"chance level {chance[0]:.3f} (random ranks)")
    ax.set(xlabel="layer (0 = embeddings)", ylabel="MRR", title=title, ylim=(0, max(1.0, max(mrr.values()))))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def table(mrr, selected, chance=None):
    """The MRR per layer, with the chance level (mean, sd) beside it if given."""
    lines = ["layer  MRR      selected" + ("   chance level" if chance else "")]
    beside = f"          {chance[0]:.4f} +- {chance[1]:.4f}" if chance else ""
    lines += [f"{l:5d}  {mrr[l]:.4f}   {'*' if l in selected else ' '}" + (beside if i == 0 else "")
              for i, l in enumerate(sorted(mrr))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runtime.HelpFormatter)
    p.add_argument("--init", required=True, help="stage-1 weights (runs/stage1/last.safetensors, .json beside it)")
    p.add_argument("--manifest", required=True, help="speech with transcripts (paper: LibriSpeech test-clean)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-pairs", type=runtime.Range(int, ge=2), default=1000, help="random pairs N (all if the manifest has fewer)")
    p.add_argument("--threshold", type=runtime.Range(float, ge=0, lt=1), default=0.05, help="select layers with MRR above this (eq. 5)")
    p.add_argument("--allow-chance-level", action="store_true",
                   help="run even when chance-level MRR (H_N / N + 3 sd for N pairs) reaches --threshold, so that a "
                        "layer without any alignment is likely to pass (paper: N = 1000, chance 0.0075)")
    p.add_argument("--seed", type=runtime.COUNT, default=0, help="which pairs are sampled")
    p.add_argument("--batch-size", type=runtime.POSITIVE_INT, default=8, help="forward batch")
    config.add_alignment_args(p)
    p.add_argument("--chunk-size", type=runtime.POSITIVE_INT, default=4096, help="OT problems solved at once")
    p.add_argument("--rows", type=runtime.POSITIVE_INT, default=32, help="speech rows of D per block (progress bar step)")
    p.add_argument("--device", type=runtime.device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the distances are computed (and the forwards run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype of the forwards")
    p.add_argument("--num-workers", type=runtime.COUNT, default=2)
    p.add_argument("--skip-bad", action="store_true", help="skip broken manifest lines and unreadable audio")
    p.add_argument("--instructions", default=None,
                   help="JSON file of instructions: this project's format or SALMONN's prompts/*_prompt.json "
                        "(data.Instructions; None: the fixed ones). Speech and text get the same one")
    config.add_model_args(p, init=True)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    entries = [e for e in data.read_manifest(args.manifest, skip_bad=args.skip_bad) if e["task"] != "aac"]
    if len(entries) < 2:
        raise data.UserError(f"--manifest {args.manifest}: need at least 2 entries with transcripts (asr/st), "
                             f"found {len(entries)}")
    if len(entries) < args.num_pairs:
        print(f"--num-pairs {args.num_pairs}: {args.manifest} has {len(entries)} usable entries; using all")
    pairs = random.Random(args.seed).sample(entries, min(args.num_pairs, len(entries)))
    chance = chance_mrr(len(pairs))
    if chance_within_reach(len(pairs), args.threshold):
        need = pairs_needed(args.threshold)
        msg = (f"with {len(pairs)} pairs the chance-level MRR is {chance[0]:.4f} +- {chance[1]:.4f} (H_N / N), within "
               f"reach of --threshold {args.threshold}: a layer without any speech-text alignment is likely to be "
               f"selected" + (f"; use at least {need} pairs" if need else ""))
        if not args.allow_chance_level:
            raise data.UserError(msg + ", or --allow-chance-level to run anyway")
        print(f"warning: {msg} (--allow-chance-level)")
    os.makedirs(args.output_dir, exist_ok=True)
    runtime.clean_temporaries(args.output_dir, ["layers.json"])

    device = torch.device(args.device)
    lsm = M.LSM.from_trainable(args.init, device=device,  # loaded there: --device cpu leaves the GPUs alone
                               **config.model_overrides(parser, argv, args)).eval()
    layers = list(range(lsm.n_layers + 1))
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"])
    collate = data.Collator(fe)
    instructions = data.Instructions(args.instructions, args.seed)
    args.instructions_used = instructions.describe()  # recorded in layers.json
    dataset = data.SpeechDataset(pairs, instructions, skip_bad=args.skip_bad, max_seconds=data.window_seconds(fe))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    speech, text, read = collect_states(lsm, loader, layers, autocast, args.align_positions)
    llm_name = os.path.basename(lsm.build_args["llm"].rstrip("/"))
    del lsm  # free the device for the distances
    n = len(read["ids"])
    if read["skipped"]:
        print(f"--skip-bad: {len(read['skipped'])} of {len(pairs)} pairs had unreadable audio and are left out: "
              f"{read['skipped'][:10]}{' ...' if len(read['skipped']) > 10 else ''}")
    if n < 2:
        raise data.UserError(f"--manifest {args.manifest}: {n} readable pair(s) left, retrieval needs at least 2")
    chance = chance_mrr(n)
    if n != len(pairs) and chance_within_reach(n, args.threshold):
        print(f"warning: with the {n} readable pairs the chance-level MRR is {chance[0]:.4f} +- {chance[1]:.4f}, "
              f"within reach of --threshold {args.threshold}")

    mrr = layer_mrrs(speech, text, eps=args.ot_eps, n_iters=args.ot_iters, chunk_size=args.chunk_size,
                     rows=args.rows, device=device, cost=args.ot_cost, ids=read["ids"])
    return write_outputs(args, mrr, select(mrr, args.threshold), chance, read, llm_name)


def write_outputs(args, mrr, selected, chance, read, llm_name):
    """layers.json (-> its content), mrr_per_layer.png and the table on stdout."""
    n = len(read["ids"])
    result = dict(mrr={str(l): v for l, v in mrr.items()}, selected=selected, threshold=args.threshold,
                  num_pairs=n, chance=dict(mrr=chance[0], sd=chance[1]), counts=read["counts"],
                  skipped=read["skipped"], args=vars(args))
    runtime.atomic(os.path.join(args.output_dir, "layers.json"),
                   lambda path: runtime.write_text(path, json.dumps(result, indent=1)))
    plot(mrr, args.threshold, os.path.join(args.output_dir, "mrr_per_layer.png"),
         f"speech-to-text retrieval, {n} pairs ({llm_name})", chance)
    print(table(mrr, selected, chance))
    print(f"selected layers (MRR > {args.threshold}): {selected} -> {os.path.join(args.output_dir, 'layers.json')}")
    print(f"data: {read['counts']['bad_audio']} unreadable clip(s) skipped, {read['counts']['truncated']} clip(s) cut "
          f"to Whisper's window")
    return result


if __name__ == "__main__":
    runtime.cli(main, "select_layers.py")
