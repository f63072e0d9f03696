"""Stage 3 of AI-STA (paper section 4.3): speech translation fine-tuning with speech-text alignment.

Starting from the stage-1 weights (--init), each step runs the speech forward (cross-entropy of the
translation, with gradient) and the transcript, with the same instruction, in place of the speech through
the LLM without gradient (LSM.text_forward stops after the deepest selected layer). The loss is eq. 6:

    L = alpha * L_CE + sum_{l in I} (1 - alpha) / |I| * W_l,     W_l = W(h^s_l, stopgrad(h^t_l))

W_l (eq. 1) is the entropic Wasserstein distance (ot.wasserstein, squared Euclidean cost, uniform masses)
between the speech states at layer l and the detached transcript states at layer l; the batch mean is taken.
Which speech positions (--align-positions, model.alignment_mask): "real" (default; this project's reading of
the paper, which does not say) the windows that overlap real audio, "all" every speech position the LLM saw
(SALMONN feeds all 88 windows; a 5 s clip has 15 real ones); the same with --speech-tokens real. The ground cost
(--ot-cost, model.cost_points; beyond the paper): "sqeuclidean" |h^s_i - h^t_j|^2 (eq. 1, default) or "cosine"
1 - cos(h^s_i, h^t_j) = half the squared distance of the L2-normalised states, blind to the norms, which drift
apart between the modalities with depth. Both flags act on every --align mode (its speech positions) and, with
the same names, on select_layers.py and evaluate.py. alpha = 0.99 makes the OT weight the paper's 0.01.
I comes from stage 2 (--layers-from runs/stage2/layers.json) or by hand (--layers 0 1).

--align chooses the alignment (paper Table 4; the baselines act on the embedding layer, layer 0):
  ot    AI-STA, eq. 6 above.
  ctc   a new trainable Linear(d_llm, V + 1) (V = the LLM vocabulary, the extra class is the CTC blank) on the
        layer-0 speech states (real windows only), CTC loss against the transcript's token ids from the LLM's
        tokenizer: L = alpha * L_CE + (1 - alpha) * L_CTC. The head is trained and saved in checkpoint.pt
        (it is not part of the LSM: last/best.safetensors do not hold it). Transcripts longer than the
        number of real windows (3 per second) cannot be aligned: their CTC loss is 0 (zero_infinity).
  cl    multi-class N-pair contrastive loss (Sohn 2016) on length-averaged layer-0 representations,
        the other pairs of the GLOBAL batch as negatives (the text vectors are gathered over the ranks): with
        s_i, t_j the mean speech / text vectors, sim_ij = cos(s_i, t_j) / tau over all texts j of the global
        batch,  L_CL = -1/B sum_i log softmax_j(sim_ij)[i];  L = alpha * L_CE + (1 - alpha) * L_CL.
  none  the base model of Table 2: L = L_CE.

Validation every --eval-every steps on --dev (teacher-forced next-token accuracy of the target, and loss);
training stops when the accuracy has not beaten its best for --patience validations in a row; the best
weights are in best.safetensors. Paper (appendix A.1): as stage 1 but 3k warm-up steps, no fixed step
count. --max-steps only bounds the run and sets the cosine horizon (not from the paper).

    torchrun --nproc_per_node 8 joint_train.py --init runs/stage1/last.safetensors \\
        --layers-from runs/stage2/layers.json --train data/covost/covost2.en-zh.train.jsonl \\
        --dev data/covost/covost2.en-zh.dev.jsonl --output-dir runs/aista-zh
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import config
import data
import model as M
import ot
import runtime
import train


class AlignedObjective(train.Objective):
    """train.Objective with the alignment term of eq. 6 (or a Table 4 baseline) added to the cross-entropy."""

    def __init__(self, lsm, align="ot", layers=(0,), alpha=0.99, ot_eps=ot.EPS, ot_iters=ot.N_ITERS,
                 cl_temperature=0.1, align_positions="real", ot_cost="sqeuclidean"):
        super().__init__(lsm)
        if align not in ("ot", "ctc", "cl", "none"):
            raise ValueError(f"--align must be ot, ctc, cl or none, got {align!r}")
        if align_positions not in config.ALIGN_POSITIONS or ot_cost not in config.OT_COSTS:
            raise ValueError(f"--align-positions {align_positions!r} / --ot-cost {ot_cost!r}: expected one of "
                             f"{config.ALIGN_POSITIONS} / {config.OT_COSTS}")
        self.align, self.alpha, self.ot_eps, self.ot_iters, self.tau = align, alpha, ot_eps, ot_iters, cl_temperature
        self.align_positions, self.ot_cost = align_positions, ot_cost
        self.layers = {"ot": tuple(layers), "ctc": (0,), "cl": (0,), "none": ()}[align]
        if align == "ot" and not self.layers:
            raise ValueError("--align ot needs at least one layer (--layers or --layers-from)")
        lsm._check_layers(self.layers)
        if align == "ctc":
            self.vocab = lsm.causal_lm.get_output_embeddings().out_features  # blank = vocab
            self.ctc_head = nn.Linear(lsm.proj.out_features, self.vocab + 1)

    def forward(self, batch):
        out = self.lsm.speech_forward(batch, self.layers)
        ce = out["loss"]
        logs = dict(ce=ce.detach(), n_correct=out["n_correct"], n_tokens=out["n_tokens"])
        if self.align == "none":
            return dict(loss=ce, **logs)
        if any(t is None for t in batch["transcripts"]):
            raise ValueError(f"--align {self.align} needs a transcript for every item; batch {batch['ids']} has none "
                             f"for some (audio captioning entries?)")
        speech_mask = M.alignment_mask(out, self.align_positions)  # the speech positions that are aligned
        if self.align == "ctc":
            align = self.ctc_loss(out["hidden"][0], speech_mask, batch["transcripts"])
            return dict(loss=self.alpha * ce + (1 - self.alpha) * align, ctc=align.detach(), **logs)
        # text states: no gradient (LSM.text_forward runs under no_grad) and detached again for clarity
        text, text_mask = self.lsm.text_forward(batch["transcripts"], batch["instructions"], self.layers)
        if self.align == "cl":
            align = n_pair_loss(M.masked_mean(out["hidden"][0], speech_mask),
                                M.masked_mean(text[0].detach(), text_mask), self.tau)
            return dict(loss=self.alpha * ce + (1 - self.alpha) * align, cl=align.detach(), **logs)
        # the aligned positions are a prefix: the unused tail (88 -> n) is cut (one host read; speech_forward's
        # selection of the target positions has synchronised already)
        n = int(speech_mask.sum(1).max())
        w = self.ot_distances([out["hidden"][l][:, :n] for l in self.layers], speech_mask[:, :n],
                              [text[l] for l in self.layers], text_mask)
        loss = self.alpha * ce + (1 - self.alpha) / len(self.layers) * w.sum()  # eq. 6
        logs.update({f"w_{l}": w[i].detach() for i, l in enumerate(self.layers)})
        return dict(loss=loss, **logs)

    def ot_distances(self, speech, speech_mask, text, text_mask):
        """The W_l of eq. 6, batch means -> (|I|,). speech, text: one (B, n, d) / (B, m, d) tensor per layer of I.
        All layers go into one batched Sinkhorn call (each problem has its own eps and masses, so this equals one
        call per layer). No host read: it runs on any device, the meta device included, and compiles as one graph."""
        L, B = len(speech), len(speech_mask)
        x, y, scale = M.cost_points(torch.cat(speech), torch.cat([t.detach() for t in text]), self.ot_cost)
        return scale * ot.wasserstein(x, y, speech_mask.repeat(L, 1), text_mask.repeat(L, 1),
                                      eps=self.ot_eps, n_iters=self.ot_iters).view(L, B).mean(1)

    def skip_batch(self):
        """A micro-batch with no readable item on this rank (train.train_step runs no forward for it): the contrastive
        loss of the other ranks gathers the texts of every rank, so send zero rows (ot, ctc, none: nothing to do)."""
        if self.align == "cl":
            dtype = torch.promote_types(self.lsm.proj.weight.dtype, torch.float32)  # as n_pair_loss gathers
            gather_rows(torch.zeros(0, self.lsm.proj.out_features, dtype=dtype, device=self.lsm.device))

    def ctc_loss(self, speech0, speech_mask, transcripts):
        """CTC between the head's log-probabilities over the real windows and the transcript token ids."""
        ids = [self.lsm.tokenizer(t, add_special_tokens=False).input_ids for t in transcripts]
        # layer 0 is in the LLM's dtype (bf16 by default), the head is a float32 Linear: without autocast
        # (--dtype float32) the states take the head's dtype; under autocast the product runs in bf16 either way
        logits = self.ctc_head(speech0.to(self.ctc_head.weight.dtype))
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (W, B, V + 1)
        targets = torch.tensor([i for x in ids for i in x], dtype=torch.long, device=log_probs.device)
        return F.ctc_loss(log_probs, targets, speech_mask.sum(1), torch.tensor([len(x) for x in ids]),
                          blank=self.vocab, zero_infinity=True)


def n_pair_loss(s, t, tau):
    """Multi-class N-pair loss with the negatives of the global batch. s (B, d): this rank's speech vectors; t (B, d)
    the texts of the same items (no gradient: detached here, as stage 3 detaches the text side). The texts of all
    ranks are gathered (gather_rows), so with T the N >= B texts of the global batch and o this rank's offset in it:

        L = 1/B sum_i -log softmax_j( cos(s_i, T_j) / tau )[o + i]

    The gradient reaches this rank's speech vectors only; the training loop's average of the ranks' gradients is then
    the gradient of the mean over the global batch (for equal per-rank batches). A rank with no readable item in its
    micro-batch takes part through AlignedObjective.skip_batch (zero rows). One process: N = B, in-batch negatives.
    The temperature tau sets the logit range 1/tau (cosines lie in [-1, 1]): a small tau sharpens the softmax, so
    the gradient concentrates on the negatives most similar to the speech (the hard ones) and the loss nears 0 once
    the true text's cosine leads every negative's by several tau; a large tau spreads the gradient over all
    negatives and bounds the loss from below (tau = 1: L >= log(1 + (N - 1) e^-2)). Default 0.1."""
    dtype = torch.promote_types(s.dtype, torch.float32)  # float32 at least (bf16 under autocast)
    t, offset = gather_rows(t.detach().to(dtype))
    sim = F.normalize(s.to(dtype), dim=-1) @ F.normalize(t, dim=-1).T / tau
    return F.cross_entropy(sim, offset + torch.arange(len(s), device=sim.device))


def gather_rows(x):
    """(all ranks' rows of x concatenated in rank order, this rank's offset in it); ranks may hold different numbers
    of rows. No gradient (a plain all_gather). One process, or no process group: (x, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(k) for k in sizes]
    padded = x.new_zeros(max(sizes), *x.shape[1:])  # all_gather needs equal shapes
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:k] for part, k in zip(parts, sizes)]), sum(sizes[:rank])


def read_layers(path):
    """layers.json of select_layers.py -> its "selected" list (error if empty)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise data.UserError(f"--layers-from {path}: cannot read it ({e})") from None
    selected = doc.get("selected") if isinstance(doc, dict) else None
    if not isinstance(selected, list) or not all(isinstance(l, int) for l in selected):
        raise data.UserError(f"--layers-from {path}: no list of integers under 'selected'")
    if not selected:
        raise data.UserError(f"--layers-from {path}: no layer passed the threshold; give --layers by hand "
                             f"(the paper always keeps layer 0)")
    return selected


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runtime.HelpFormatter)
    p.add_argument("--init", required=True, help="stage-1 weights (runs/stage1/last.safetensors; its .json beside it "
                                                 "rebuilds the model; model flags given here override it)")
    p.add_argument("--train", required=True, help="training manifest (ST, with transcripts)")
    p.add_argument("--align", default="ot", choices=["ot", "ctc", "cl", "none"],
                   help="ot: AI-STA (eq. 6); ctc / cl: Table 4 baselines at layer 0; none: cross-entropy only")
    p.add_argument("--layers", type=runtime.COUNT, nargs="+", default=None, help="layers I to align with --align ot (0 = embeddings)")
    p.add_argument("--layers-from", default=None, help="layers.json of select_layers.py (its 'selected' layers)")
    p.add_argument("--alpha", type=runtime.Range(float, ge=0, le=1), default=0.99, help="CE weight; the alignment weight is 1 - alpha (eq. 6)")
    p.add_argument("--cl-temperature", type=runtime.POSITIVE, default=0.1,
                   help="temperature tau of --align cl: cosines / tau, small = focus on the hardest negatives")
    config.add_alignment_args(p)
    config.add_model_args(p, init=True)
    train.add_train_args(p, warmup_steps=3000, max_steps=80000, validation=True)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.layers is not None and args.layers_from is not None:
        p.error("give --layers or --layers-from, not both")
    runtime.distinct(p, "layers", args.layers)
    layers = read_layers(args.layers_from) if args.layers_from else args.layers
    if args.align == "ot" and not layers:
        p.error("--align ot needs --layers or --layers-from")
    if args.align != "ot" and layers and int(os.environ.get("RANK", "0")) == 0:
        print(f"--align {args.align}: ignoring the layers {layers} ({'layer 0' if args.align != 'none' else 'no alignment'})")
    args.layers = layers if args.align == "ot" else None
    before = data.STATS["bad_lines"]
    train_entries = data.read_nonempty(args.train, "--train", args.skip_bad)
    bad_lines = data.STATS["bad_lines"] - before
    dev_entries = data.read_nonempty(args.dev, "--dev", args.skip_bad) if args.dev else None

    torch.manual_seed(args.seed)  # the same CTC head on every rank
    lsm = M.LSM.from_trainable(args.init, **config.model_overrides(parser, argv, args))
    objective = AlignedObjective(lsm, args.align, layers or (), args.alpha, args.ot_eps, args.ot_iters,
                                 args.cl_temperature, args.align_positions, args.ot_cost)
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"])
    collate, max_seconds = data.Collator(fe), data.window_seconds(fe)  # clips are cut to Whisper's window
    instructions = data.Instructions(args.instructions, args.seed)
    args.instructions_used = instructions.describe()  # recorded in args.json
    dataset = lambda entries: data.SpeechDataset(entries, instructions, skip_bad=args.skip_bad, max_seconds=max_seconds)
    dev = dataset(dev_entries) if dev_entries else None
    return train.train(args, objective, dataset(train_entries), collate, dev_set=dev, bad_lines=bad_lines)


if __name__ == "__main__":
    runtime.cli(main, "joint_train.py")
