"""Stage 1 of AI-STA (paper section 4.1): speech pre-training on ASR and audio captioning (AAC).

From freshly initialised LayerNorms, Q-Former, projector and LoRA (encoders and LLM frozen), minimise the
causal-LM cross-entropy of the target T (transcript or caption) given the speech tokens E^S and the
instruction I (paper eq. 2):

    L_CE = -sum_{m=1}^{M} log P(T_m | T_<m, E^S, I; theta)

Paper defaults (appendix A.1): AdamW, lr 1e-6 -> 3e-5 (9k warm-up) -> cosine to 1e-5, weight decay 0.05,
global batch 32, 80k steps, bf16, LoRA r 8 / alpha 32 / dropout 0.1. Training loop: train.py.

Data mixing. `--train PATH[:WEIGHT] ...` (weight 1 if left out). By default (--mix-by size) manifest k is drawn
in proportion to its size n_k scaled by its weight w_k, as SALMONN draws uniformly from the concatenation of its
data lists:

    share_k = w_k n_k / sum_j w_j n_j       (data.mix_shares; data.WeightedMixSampler draws with these shares)

so without weights every entry is equally likely, and a weight multiplies a manifest's share relative to its size
(w = 2: as if every entry were listed twice; w = 0.2: as if it had a fifth of its entries). --mix-by equal gives
every manifest the same base share instead: the weights are the shares (w_k / sum w; no weights = equal shares).
At start one line per manifest is printed (entries, weight, share, expected passes over it in the run =
share x max-steps x batch-size / entries) and args.json records it under "mix". An epoch has --epoch-size draws
(default: the total number of entries). The paper's data (Table 1: LibriSpeech 280K, GigaSpeech M 680K, WavCaps
370K, AudioCaps 45K, Clotho 4K; Clotho's manifest has one entry per caption, 5 per clip, so weight 0.2 counts
its clips as the table does):

    torchrun --nproc_per_node 8 pretrain.py --output-dir runs/stage1 \\
        --train data/librispeech_train.jsonl data/gigaspeech_m.jsonl data/wavcaps.jsonl data/audiocaps_train.jsonl \\
                data/clotho_dev.jsonl:0.2 \\
        --llm Qwen/Qwen2-7B --whisper openai/whisper-large-v2 --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt

Output (--output-dir): last.safetensors (+ .json) -- the stage-2/3 --init --, checkpoint.pt (--resume),
metrics.jsonl, args.json.
"""
import argparse
import os

import torch

import config
import data
import model as M
import runtime
import train


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runtime.HelpFormatter)
    p.add_argument("--train", nargs="+", required=True, metavar="MANIFEST[:WEIGHT]",
                   help="training manifests (ASR, AAC) with optional weights (default 1): with --mix-by size a "
                        "manifest's share is weight x entries / sum over manifests (weight 0.5: as if it had half "
                        "its entries); with --mix-by equal the share is weight / sum of weights")
    p.add_argument("--mix-by", default="size", choices=["size", "equal"],
                   help="base share of a manifest before its weight: size = its number of entries (SALMONN: one "
                        "uniform draw from the concatenation), equal = the same for every manifest")
    p.add_argument("--epoch-size", type=runtime.POSITIVE_INT, default=None, help="draws per epoch (default: all entries)")
    config.add_model_args(p)
    train.add_train_args(p, warmup_steps=9000, max_steps=80000)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    sources = train.parse_manifests(args.train)
    before = data.STATS["bad_lines"]
    entries = [data.read_nonempty(path, "--train", args.skip_bad) for path, _ in sources]
    torch.manual_seed(args.seed)  # the same fresh Q-Former / projector / LoRA on every rank
    lsm = M.LSM.from_args(args)
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(args.whisper)
    collate = data.Collator(fe)
    instructions = data.Instructions(args.instructions, args.seed)
    args.instructions_used = instructions.describe()  # recorded in args.json
    dataset = data.SpeechDataset([x for e in entries for x in e], instructions, skip_bad=args.skip_bad,
                                 max_seconds=data.window_seconds(fe))
    sizes = [len(e) for e in entries]
    shares = mix(args, sources, sizes)
    return train.train(args, train.Objective(lsm), dataset, collate, sizes=sizes, weights=shares,
                       epoch_size=args.epoch_size, bad_lines=data.STATS["bad_lines"] - before)


def mix(args, sources, sizes):
    """The sampling shares of the --train manifests (data.mix_shares); prints one line per manifest and records
    them in args.mix (train.train writes vars(args) to args.json)."""
    try:
        shares = data.mix_shares(sizes, [w for _, w in sources], args.mix_by)
    except ValueError as e:
        raise data.UserError(f"--train: {e}") from None
    draws = args.max_steps * args.batch_size
    args.mix = [dict(path=path, entries=n, weight=w, share=share, passes=share * draws / n)
                for (path, w), n, share in zip(sources, sizes, shares)]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stage-1 mix (--mix-by {args.mix_by}; {args.max_steps} steps x {args.batch_size} = {draws:,} draws):")
        for m in args.mix:
            print(f"  {m['path']}: {m['entries']:,} entries, weight {m['weight']:g}, share {m['share']:.2%}, "
                  f"{m['passes']:.2f} passes over it")
    return shares


if __name__ == "__main__":
    runtime.cli(main, "pretrain.py")
