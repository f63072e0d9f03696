"""Stage 1 of AI-STA (paper section 4.1): speech pre-training on ASR and audio captioning (AAC).

From freshly initialised LayerNorms, Q-Former, projector and LoRA (encoders and LLM frozen), minimise the
causal-LM cross-entropy of the target T (transcript or caption) given the speech tokens E^S and the
instruction I (paper eq. 2):

    L_CE = -sum_{m=1}^{M} log P(T_m | T_<m, E^S, I; theta)

Paper defaults (appendix A.1): AdamW, lr 1e-6 -> 3e-5 (9k warm-up) -> cosine to 1e-5, weight decay 0.05,
global batch 32, 80k steps, bf16, LoRA r 8 / alpha 32 / dropout 0.1. Training loop: train.py.

Manifests (data.py format) are mixed with sampling weights: `--train PATH[:WEIGHT] ...` (weight 1 if left
out). Each draw picks manifest k with probability w_k / sum(w) (data.WeightedMixSampler); an epoch has
--epoch-size draws (default: the total number of entries). The paper's data:

    torchrun --nproc_per_node 8 pretrain.py --output-dir runs/stage1 \\
        --train librispeech_train.jsonl gigaspeech_m.jsonl wavcaps.jsonl audiocaps.jsonl clotho.jsonl \\
        --llm Qwen/Qwen2-7B --whisper openai/whisper-large-v2 --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt

Output (--output-dir): last.safetensors (+ .json) -- the stage-2/3 --init --, checkpoint.pt (--resume),
metrics.jsonl, args.json.
"""
import argparse

import torch

import data
import model as M
import train


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    p.add_argument("--train", nargs="+", required=True, metavar="MANIFEST[:WEIGHT]",
                   help="training manifests (ASR, AAC) with optional sampling weights, e.g. asr.jsonl:1 aac.jsonl:0.5")
    p.add_argument("--epoch-size", type=int, default=None, help="draws per epoch (default: all entries)")
    M.add_model_args(p)
    train.add_train_args(p, warmup_steps=9000, max_steps=80000)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    sources = train.parse_manifests(args.train)
    before = data.STATS["bad_lines"]
    entries = [data.read_manifest(path, skip_bad=args.skip_bad) for path, _ in sources]
    for (path, _), e in zip(sources, entries):
        if not e:
            raise data.UserError(f"--train {path}: no usable entry" + (" (every line was skipped as broken)"
                                                                       if args.skip_bad else ""))
    torch.manual_seed(args.seed)  # the same fresh Q-Former / projector / LoRA on every rank
    lsm = M.LSM.from_args(args)
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(args.whisper)
    collate = data.Collator(fe)
    dataset = data.SpeechDataset([x for e in entries for x in e], data.Instructions(args.instructions, args.seed),
                                 skip_bad=args.skip_bad, max_seconds=data.window_seconds(fe))
    return train.train(args, train.Objective(lsm), dataset, collate, sizes=[len(e) for e in entries],
                       weights=[w for _, w in sources], epoch_size=args.epoch_size,
                       bad_lines=data.STATS["bad_lines"] - before)


if __name__ == "__main__":
    train.cli(main, "pretrain.py")
