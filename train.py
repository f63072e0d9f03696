"""The one training loop of AI-STA, shared by stage 1 (pretrain.py) and stage 3 (joint_train.py).

Plain PyTorch: run with `python` (one process) or `torchrun --nproc_per_node N` (data parallel over the
trainable parameters: their gradients are all-reduced once per step; nccl on CUDA, gloo on CPU). Every rank
loads the frozen encoders and LLM itself.

Batches. --batch-size is the GLOBAL batch B (paper: 32) = b x k x W, with b = --per-device-batch-size,
k = --grad-accum and W = the number of processes. Each epoch has one global order of the training items, a
function of (--seed, epoch) only (data.WeightedMixSampler: the weighted mixture of the manifests; one
manifest = a shuffle). Step s of an epoch takes the items order[s*B : (s+1)*B] and cuts them into W*k
micro-batches of b consecutive items; rank r runs micro-batches r*k .. r*k + k - 1. Hence
  * a step's gradient is the mean over its W*k micro-batch losses for any factorisation of B (the gradient sums
    are all-reduced over ranks and divided by W*k), up to the order of the float additions: 2 ranks x 1
    micro-batch give exactly the weights of 1 rank x 2 accumulated micro-batches (tests/test_train.py).
    (DistributedSampler's strided split would group different items into a micro-batch for different W.)
  * the data position is (epoch, step in epoch): --resume skips the consumed batches without reading them.
Dropout: torch's RNG is reseeded before every micro-batch from (seed, step, micro-batch index in the global
batch), so dropout masks depend neither on W and k nor on where a run was resumed.

Unreadable items (--skip-bad): an item whose audio cannot be read is dropped from its micro-batch (the
micro-batch loss is the mean over the items left); a micro-batch with none left runs no forward and the step's
gradient is the mean over its non-empty micro-batches (all ranks together: the divisor is their global count),
so an unreadable item costs nothing but its own absence, at any position, and a resume across it equals the
uninterrupted run. A step with no readable item at all makes no update (Adam does not step) and logs no loss.
The gradients are all-reduced by this loop itself (no DistributedDataParallel), so a rank may skip a forward;
an objective whose forward runs collectives (the contrastive baseline gathers the texts of every rank) takes part
in them through join() instead, once for each micro-batch it skips, so every rank runs the same collectives.

Optimiser (paper appendix A.1, SALMONN): AdamW(beta1 0.9, beta2 0.999, eps 1e-8), weight decay 0.05 on
weight matrices only (biases, norms and other 1-d parameters have none); only trainable parameters.
Learning rate at step s (0-based), SALMONN's linear warm-up + cosine schedule, made per-step:
    lr(s) = lr_0 + (lr_max - lr_0) * s / S_w                                     s <  S_w
    lr(s) = lr_min + (lr_max - lr_min) * (1 + cos(pi * (s - S_w) / (S - S_w))) / 2     S_w <= s <= S
lr_0 = --warmup-start-lr 1e-6, lr_max = --lr 3e-5, lr_min = --min-lr 1e-5, S_w = --warmup-steps,
S = --max-steps.

Non-finite loss or gradient norm (identical on every rank): the step is skipped on all ranks (gradients zeroed,
no update; the step still counts: its data is consumed and the schedule moves on) and counted ("bad_steps" in
the metrics); no checkpoint is written during a streak of them (a due one waits for the next finite step), and
--max-bad-steps in a row stop the run with an error naming the last checkpoint, which is from before the streak.

Resume (--resume). checkpoint.pt stores the training-relevant flags (runtime.training_record). A resume whose flags
differ stops and lists each difference (flag, checkpoint value, new value); --resume-changes apply trains with
the new values from the resumed step on (the schedule and every optimizer group's lr, weight decay, betas and
eps), and args.json ("resume_history") and metrics.jsonl (an "event": "resume" row) say from which step which
values held. --seed, --batch-size, --train (and the manifests' sizes), --epoch-size, --align and --init can
never change. Another number of processes keeps the checkpoint's micro-batch size and adapts the accumulation
(exact up to float summation order), or stops where B / (b x W) is not a whole number.

Processes: a collective that waits more than --dist-timeout minutes (a dead or stuck rank) ends the run with
`<script>.py: error: rank R: ...` instead of hanging.

Output folder (--output-dir): args.json (+ the batch layout used and the resume history); metrics.jsonl (one
JSON object per --log-every steps: "step" = steps done, means over those steps of the objective's values,
"lr" of the last one, "grad_norm", "samples_per_s", "bad_steps", and the data counts summed over workers and
ranks "n_bad_audio" (unreadable clips skipped) and "n_truncated" (clips cut to Whisper's window); one per
validation with "split": "dev"; an "end" record with the run's totals: "counts", "bad_lines" (manifest lines
skipped), "empty_steps"); checkpoint.pt (full training state for --resume: trainable parameters, optimiser,
scheduler, step, data position, per-rank RNG states, early-stopping state, training record); last.safetensors
(+ .json: LSM.save_trainable, the next stage's --init); best.safetensors (with a dev set: best validation
accuracy). Every file is written under a temporary name and renamed (os.replace): a kill never leaves a
half-written file, and the temporary files a kill leaves are removed when a run starts and ends.

The objective is an nn.Module (Objective below is stage 1's; joint_train.Joint extends it):
    forward(batch)  -> dict of scalar tensors: "loss" is minimised; every entry is logged, as the mean over
                       micro-batches and ranks, except keys starting with "n_" (counts), which are summed
    evaluate(batch) -> dict with "loss", "n_correct", "n_tokens" (validation, no gradient)
    join()          -> None: take part in forward()'s collectives for a micro-batch with no readable item
                       (nothing to do for an objective without any)
    save_trainable(path)                 weights for the next stage
    enable_gradient_checkpointing()
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import data
import runtime



# ----------------------------------------------------------------------------- flags




def add_train_args(parser, *, warmup_steps, max_steps, validation=False):
    """Training flags with the paper's defaults (stage 1: warmup 9000, 80000 steps; stage 3: warmup 3000)."""
    g = parser.add_argument_group("training (paper appendix A.1)")
    g.add_argument("--output-dir", required=True, help="run folder: args, metrics, checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue from <output-dir>/checkpoint.pt (starts fresh if there is none yet)")
    g.add_argument("--resume-changes", default="refuse", choices=["refuse", "apply"],
                   help="--resume with training settings that differ from the checkpoint's: refuse (stop and list "
                        "them) or apply (train with the new values from the resumed step on: schedule, every optimizer "
                        "group; recorded in args.json and metrics.jsonl). --seed, --batch-size, --train, --epoch-size, "
                        "--align and --init can never change")
    g.add_argument("--seed", type=int, default=42, help="initialisation, data order and dropout")
    g.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    g.add_argument("--warmup-start-lr", type=float, default=1e-6, help="learning rate at step 0")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear warm-up steps")
    g.add_argument("--max-steps", type=int, default=max_steps,
                   help="optimiser steps" + ("" if not validation else
                                            " at most (cosine horizon; early stopping usually ends sooner)"))
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases/norms/1-d)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--batch-size", type=int, default=32,
                   help="GLOBAL batch = per-device batch x grad accumulation x number of processes")
    g.add_argument("--per-device-batch-size", type=int, default=None,
                   help="micro-batch per process (None: batch-size / (grad-accum x processes))")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches accumulated per step (None: batch-size / (per-device x processes))")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="autocast dtype of the forward (paper: bf16; float32 = no autocast)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip broken manifest lines and unreadable audio instead of stopping (both are counted)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    g.add_argument("--dist-timeout", type=float, default=60.0, metavar="MINUTES",
                   help="torchrun: a collective that waits longer than this for another process ends the run with an "
                        "error (a dead or stuck rank) instead of hanging. Long enough for the slowest rank to load a "
                        "13B model from a shared filesystem and for a checkpoint write or a validation pass, which "
                        "the other ranks wait for")
    g.add_argument("--instructions", default=None,
                   help="JSON file of alternative instructions per task, one drawn per item: this project's format "
                        "or SALMONN's prompts/train_prompt.json (data.Instructions; None: the fixed ones)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="testing: stop after N steps of this run WITHOUT a checkpoint, as a kill would (0: off)")
    if validation:
        g.add_argument("--dev", default=None, help="dev manifest: validation (teacher-forced accuracy and loss)")
        g.add_argument("--eval-every", type=int, default=3000, help="validate every N steps")
        g.add_argument("--patience", type=int, default=4,
                       help="stop after this many validations in a row without a new best accuracy (0: never)")
    return parser


def parse_manifests(specs):
    """["a.jsonl:1.0", "b.jsonl:0.5", "c.jsonl"] -> [("a.jsonl", 1.0), ("b.jsonl", 0.5), ("c.jsonl", 1.0)]."""
    out = []
    for spec in specs:
        path, sep, weight = spec.rpartition(":")
        try:
            out.append((path, float(weight)) if sep else (spec, 1.0))
        except ValueError:  # a colon that is part of the path
            out.append((spec, 1.0))
        if out[-1][1] < 0:
            raise data.UserError(f"--train {spec}: the sampling weight must be >= 0")
    return out


# ----------------------------------------------------------------------------- the stage-1 objective


class Objective(nn.Module):
    """Stage 1 (paper eq. 2): L_CE = -sum_m log P(T_m | T_<m, E^S, I; theta), the mean over target tokens."""

    def __init__(self, lsm):
        super().__init__()
        lsm.config.check_training_precision()  # no float16 training (config.py says why)
        self.lsm = lsm

    def forward(self, batch):
        out = self.lsm.speech_forward(batch)
        return dict(loss=out["loss"], ce=out["loss"].detach(), n_correct=out["n_correct"], n_tokens=out["n_tokens"])

    @torch.no_grad()
    def evaluate(self, batch):
        out = self.lsm.speech_forward(batch)
        return dict(loss=out["loss"], n_correct=out["n_correct"], n_tokens=out["n_tokens"])

    def join(self):
        """A skipped micro-batch: stage 1's forward runs no collective, so there is nothing to take part in."""

    def save_trainable(self, path):
        self.lsm.save_trainable(path)

    def enable_gradient_checkpointing(self):
        """Recompute the LLM decoder layers in backward (non-reentrant: the dropout masks are replayed)."""
        causal, kw = self.lsm.causal_lm, {"use_reentrant": False}
        if hasattr(causal, "activation_checkpointing_enable"):  # transformers >= 5.x name
            causal.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# ----------------------------------------------------------------------------- pieces of the loop








def batch_layout(args, world):
    """-> (per-device batch b, accumulation k) with b * k * world == --batch-size, or ValueError naming the flags."""
    B, b, k = args.batch_size, args.per_device_batch_size, args.grad_accum
    if b is None and k is None:
        k = 1
    if b is None:
        b = B // (k * world) if B % (k * world) == 0 else 0
    elif k is None:
        k = B // (b * world) if B % (b * world) == 0 else 0
    if b < 1 or k < 1 or b * k * world != B:
        raise data.UserError(f"--batch-size {B} (global) must equal --per-device-batch-size x --grad-accum x number of "
                             f"processes ({world}); got --per-device-batch-size {args.per_device_batch_size} and "
                             f"--grad-accum {args.grad_accum}")
    return b, k


def resume_layout(args, world, ck, path):
    """The batch layout of a resumed run: the checkpoint's micro-batch size b is kept (unless
    --per-device-batch-size says otherwise, a change of setting), the accumulation becomes B / (b x processes).
    With the same b every step consists of the same micro-batches with the same dropout seeds, whatever the
    number of processes: only the order of the float additions of the gradient sum changes. Where B / (b x
    processes) is not a whole number, stop with what would work."""
    b = args.per_device_batch_size if args.per_device_batch_size is not None else ck["micro_batch"]
    B = args.batch_size
    if B % (b * world) == 0 and (args.grad_accum is None or args.grad_accum * b * world == B):
        return b, B // (b * world)
    if args.grad_accum is not None and B % (b * world) == 0:
        given = argparse.Namespace(batch_size=B, per_device_batch_size=b, grad_accum=args.grad_accum)
        return batch_layout(given, world)
    fits = [w for w in range(1, B // b + 1) if (B // b) % w == 0] if B % b == 0 else []
    raise data.UserError(
        f"--resume: {path} was trained with micro-batches of {ck['micro_batch']} per device (global batch {B} = "
        f"{ck['micro_batch']} x {ck.get('grad_accum', '?')} accumulation x {ck['world_size']} processes); with "
        f"{world} processes and micro-batches of {b}, {B} / ({b} x {world}) is not a whole number of accumulation "
        f"steps. Resume with {' or '.join(map(str, fits))} processes (the same steps), or choose another micro-batch "
        f"with --per-device-batch-size N --resume-changes apply (the steps then average other groups of items)")


def lr_at(step, args):
    """Linear warm-up from --warmup-start-lr to --lr over --warmup-steps, then cosine to --min-lr at --max-steps."""
    if step < args.warmup_steps:
        return args.warmup_start_lr + (args.lr - args.warmup_start_lr) * step / args.warmup_steps
    t = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def no_decay(name, p):
    """SALMONN's rule: biases, norms and one-dimensional parameters get no weight decay."""
    return p.ndim < 2 or "bias" in name or "norm" in name.lower()


def build_optimizer(model, args):
    """AdamW over the trainable parameters in two groups (weight decay / none) + LambdaLR following lr_at."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in named if not no_decay(n, p)], weight_decay=args.weight_decay),
              dict(params=[p for n, p in named if no_decay(n, p)], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args) / args.lr)
    return opt, sched


def apply_settings(opt, sched, args, step):
    """Make a restored optimizer and schedule follow this run's flags from `step` on (--resume-changes apply):
    the restored state carries the old base lr (LambdaLR scales it by lr_at(s, new) / new lr: neither schedule)
    and the old weight decay, betas and eps of every group (load_state_dict restores the groups' settings)."""
    for group, wd in zip(opt.param_groups, (args.weight_decay, 0.0)):
        group.update(weight_decay=wd, betas=tuple(args.adam_betas), eps=args.adam_eps, initial_lr=args.lr,
                     lr=lr_at(step, args))
    sched.base_lrs = [args.lr] * len(opt.param_groups)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


# ----------------------------------------------------------------------------- what a resume may change












# ----------------------------------------------------------------------------- pieces of the loop


def epoch_order(sizes, weights, epoch_size, seed, epoch):
    """The global item order of an epoch: a function of (seed, epoch) only."""
    sampler = data.WeightedMixSampler(sizes, weights, num_samples=epoch_size, seed=seed)  # one replica: global
    sampler.set_epoch(epoch)
    return list(sampler)


def rank_micro_batches(order, first_step, global_batch, b, k, rank):
    """Index lists of the micro-batches rank `rank` runs from step `first_step` to the end of the epoch
    (incomplete last global batch dropped): micro-batch q = rank * k + j of step s is
    order[s*B + q*b : s*B + (q+1)*b]."""
    out = []
    for s in range(first_step, len(order) // global_batch):
        for q in range(rank * k, rank * k + k):
            start = s * global_batch + q * b
            out.append(order[start:start + b])
    return out


def micro_seed(seed, step, index):
    return random.Random(f"{seed}:{step}:{index}").getrandbits(63)




























COUNTS = ("bad_audio", "truncated")  # per-batch counts of data.Collator, summed over workers, ranks and steps


@torch.no_grad()
def validate(model, loader, world, autocast):
    """Teacher-forced next-token accuracy and loss of the target over the dev set (all ranks together):
    acc = sum n_correct / sum n_tokens, loss = token-weighted mean cross-entropy; the dev set's unreadable and
    truncated clips are counted (n_bad_audio, n_truncated)."""
    model.eval()
    tot = torch.zeros(3 + len(COUNTS), dtype=torch.float64)  # loss * n_tokens, n_correct, n_tokens, counts
    for batch in loader:
        counts = data.batch_counts(batch)
        tot[3:] += torch.tensor([float(counts.get(c, 0)) for c in COUNTS], dtype=torch.float64)
        if data.is_empty(batch):
            continue
        with autocast():
            out = model.evaluate(batch)
        n = out["n_tokens"].double().cpu()
        tot[:3] += torch.stack([out["loss"].double().cpu() * n, out["n_correct"].double().cpu(), n])
    model.train()
    tot = runtime.all_reduce(tot.to(runtime.reduce_device(model)), world).cpu()
    res = dict(loss=(tot[0] / tot[2]).item(), acc=(tot[1] / tot[2]).item(), n_tokens=int(tot[2]))
    res.update({f"n_{c}": int(v) for c, v in zip(COUNTS, tot[3:].tolist())})
    return res




# ----------------------------------------------------------------------------- the loop


def train_step(model, opt, params, micro, step, args, rank, world, autocast):
    """One optimiser step over this rank's k micro-batches. A micro-batch with no readable item (data.is_empty) runs
    no forward; every other one back-propagates its loss (the mean over its own items' target tokens). Then one
    gather of the logged sums and counts, and one all-reduce of the gradient sums; the step's gradient is their
    sum divided by n = the number of non-empty micro-batches of the whole step (all ranks). So an unreadable item
    costs only its own absence, wherever it is; with no bad data n = W*k and the gradient is the mean over the
    W*k micro-batch losses for any factorisation of B. The update is applied only if the loss and gradient norm are
    finite, and not at all if n == 0. Returns logs (identical on every rank): means over the non-empty micro-batches
    ("loss", ...; counts "n_*" summed), "grad_norm", "n_bad_audio", "n_truncated", "skipped" (non-finite) and
    "empty" (n == 0)."""
    k = len(micro)
    opt.zero_grad(set_to_none=True)
    sums, counts, used = {}, {c: 0 for c in COUNTS}, 0
    for j, batch in enumerate(micro):
        for c, v in data.batch_counts(batch).items():
            counts[c] = counts.get(c, 0) + v
        if data.is_empty(batch):
            model.join()  # the collectives this micro-batch's forward would have run
            continue
        torch.manual_seed(micro_seed(args.seed, step, rank * k + j))  # dropout independent of world size
        with autocast():
            out = model(batch)
        out["loss"].backward()
        used += 1
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v.detach().double().item()
    parts = runtime.all_gather_objects((used, sums, counts), world)  # summed in rank order: identical on every rank
    n = sum(p[0] for p in parts)
    logs = {f"n_{c}": sum(p[2].get(c, 0) for p in parts) for c in COUNTS}
    if n == 0:
        opt.zero_grad(set_to_none=True)
        return dict(logs, skipped=False, empty=True)
    keys = sorted({key for p in parts for key in p[1]})
    for key in keys:
        total = sum(p[1].get(key, 0.0) for p in parts)
        logs[key] = total if key.startswith("n_") else total / n
    runtime.sync_gradients(params, world, n)
    grad_norm = nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    logs["grad_norm"] = grad_norm.item()  # the same on every rank: the gradients are
    logs["skipped"] = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
    logs["empty"] = False
    if logs["skipped"]:
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    return logs


def mean_logs(rows):
    """Average step logs over a logging window: each value over the steps that have it (a step whose every item
    was unreadable has no loss), counts n_* summed; acc = n_correct / n_tokens if present."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if key in r]
        out[key] = sum(vals) / (1 if key.startswith("n_") else len(vals))
    if out.get("n_tokens"):
        out["acc"] = out["n_correct"] / out["n_tokens"]
    return out


def train(args, model, train_set, collate, *, sizes=None, weights=None, epoch_size=None, dev_set=None, bad_lines=0):
    """Train `model` (the objective, see the module docstring) on `train_set` (items indexed like the
    concatenation of sources with `sizes`, mixed with `weights`; default: one source, weight 1).
    bad_lines: manifest lines the caller skipped (--skip-bad), for the record.
    Returns a summary dict (step, bad_steps, best validation, ...)."""
    with runtime.process_group(getattr(args, "dist_timeout", 60.0)) as (rank, world, device):
        return _train(args, model, train_set, collate, sizes or [len(train_set)], weights or [1.0],
                      epoch_size, dev_set, rank, world, device, bad_lines)






def _train(args, model, train_set, collate, sizes, weights, epoch_size, dev_set, rank, world, device, bad_lines):
    from tqdm import tqdm
    B, out_dir = args.batch_size, args.output_dir
    say = print if rank == 0 else (lambda *a, **kw: None)
    if sum(sizes) != len(train_set):
        raise ValueError(f"train(): source sizes {sizes} do not add up to the {len(train_set)} training items")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, runtime.CHECKPOINT)
    if os.path.exists(ckpt_path) and not args.resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or another --output-dir")
    if rank == 0:
        removed = runtime.clean_temporaries(out_dir, runtime.OWN_FILES)
        if removed:
            say(f"removed {len(removed)} temporary file(s) left by a killed save in {out_dir}: {', '.join(removed)}")

    resumed = args.resume and os.path.exists(ckpt_path)
    ck = runtime.read_checkpoint(ckpt_path) if resumed else None
    if ck is not None:
        runtime.check_fixed(ck, args, sizes, ckpt_path)
    if ck is not None and "micro_batch" in ck:
        b, k = resume_layout(args, world, ck, ckpt_path)
    else:
        b, k = batch_layout(args, world)
    rec = runtime.training_record(args, b)
    changes = runtime.check_changes(ck, rec, args, ckpt_path) if ck is not None else []
    history = list(ck.get("history", [])) if ck is not None else []

    model.to(device).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = build_optimizer(model, args)
    st = dict(step=0, epoch=0, step_in_epoch=0, bad_steps=0, bad_in_row=0, best_acc=None, best_step=None,
              since_best=0, empty_steps=0, counts={c: 0 for c in COUNTS})
    layout_note = None
    if ck is not None:
        runtime.load_checkpoint(ck, ckpt_path, model, opt, sched, st, rank, world)
        say(f"resumed {ckpt_path} at step {st['step']} (epoch {st['epoch']}, step {st['step_in_epoch']} of it)")
        if changes:
            apply_settings(opt, sched, args, st["step"])
            history.append(dict(step=st["step"], changes={k_: dict(old=o, new=n) for k_, o, n in changes}))
            say(f"--resume-changes apply: from step {st['step']} on " + ", ".join(
                f"{runtime.flag(k_)} {n!r} (was {o!r})" for k_, o, n in changes))
        if (ck["world_size"], ck.get("grad_accum", k)) != (world, k):
            layout_note = dict(world_size=[ck["world_size"], world], grad_accum=[ck.get("grad_accum"), k],
                               per_device_batch_size=b)
            say(f"--resume: {ck['world_size']} -> {world} process(es): micro-batches of {b} per device kept, "
                f"accumulation {ck.get('grad_accum')} -> {k}; every step has the same micro-batches and dropout "
                f"masks (reseeded per micro-batch), only the order of the float additions of the gradient changes")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")
    meta = dict(record=rec, history=history, sizes=list(sizes), micro_batch=b, grad_accum=k)
    if rank == 0:
        record = dict(vars(args), layout=dict(per_device_batch_size=b, grad_accum=k, world_size=world),
                      resume_history=history)
        runtime.atomic(os.path.join(out_dir, runtime.ARGS), lambda p: runtime.write_text(p, json.dumps(record, indent=1, default=str)))
    metrics = runtime.Metrics(out_dir, rank, st["step"] if resumed else None)
    if changes or layout_note:
        metrics.write(dict(event="resume", step=st["step"], changes=history[-1]["changes"] if changes else {},
                           **(layout_note or {})))

    runtime.broadcast_parameters(params, world)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    loader_kw = dict(collate_fn=collate, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    dev_loader = None
    if dev_set is not None:
        mine = list(range(len(dev_set)))[rank::world]
        dev_loader = DataLoader(dev_set, batch_sampler=[mine[i:i + b] for i in range(0, len(mine), b)], **loader_kw)

    say(f"training: {len(train_set)} items, global batch {B} = {b} per device x {k} accumulation x {world} "
        f"process(es) on {device}, {sum(p.numel() for p in params):,} trainable parameters, steps "
        f"{st['step']} -> {args.max_steps}")
    bar = tqdm(total=args.max_steps, initial=st["step"], disable=rank != 0, dynamic_ncols=True, desc="train")
    window, t_last, steps_run, stop = [], time.time(), 0, None
    validated_at = saved_at = st["step"] if resumed else None
    pending_save = False  # a checkpoint due during a streak of non-finite steps waits for a finite one
    if dev_loader is not None and args.patience > 0 and st["since_best"] >= args.patience:
        stop = "early_stop"  # a resumed run that had already stopped early
    while stop is None and st["step"] < args.max_steps:
        order = epoch_order(sizes, weights, epoch_size or sum(sizes), args.seed, st["epoch"])
        if len(order) < B:
            raise data.UserError(f"an epoch has {len(order)} items, fewer than one global batch (--batch-size {B})")
        micro = rank_micro_batches(order, st["step_in_epoch"], B, b, k, rank)
        batches = iter(DataLoader(train_set, batch_sampler=micro, **loader_kw))
        while stop is None and st["step"] < args.max_steps and st["step_in_epoch"] < len(order) // B:
            lr = opt.param_groups[0]["lr"]
            logs = train_step(model, opt, params, [next(batches) for _ in range(k)], st["step"], args, rank, world,
                              autocast)
            for c in COUNTS:
                st["counts"][c] += logs[f"n_{c}"]
            if logs.pop("empty"):
                st["empty_steps"] += 1
                say(f"\nstep {st['step']}: no readable audio in the whole batch: no update")
            if logs.pop("skipped"):
                st["bad_steps"] += 1
                st["bad_in_row"] += 1
                say(f"\nstep {st['step']}: non-finite loss {logs['loss']} / gradient norm {logs['grad_norm']}: "
                    f"skipped ({st['bad_in_row']} in a row, {st['bad_steps']} in total)")
                if st["bad_in_row"] >= args.max_bad_steps:
                    raise Diverged(
                        f"{st['bad_in_row']} non-finite steps in a row (last: step {st['step']}) reached "
                        f"--max-bad-steps {args.max_bad_steps}; stopping without saving. The last good checkpoint, "
                        f"written before these steps: "
                        + (f"{ckpt_path} (step {saved_at})." if saved_at is not None else "none yet.")
                        + " Resume from it with a lower --lr, --grad-clip 1.0 or --dtype float32 (--resume "
                          "--resume-changes apply), or start again.")
            elif "loss" in logs:
                st["bad_in_row"] = 0
            sched.step()
            st["step"] += 1
            st["step_in_epoch"] += 1
            steps_run += 1
            bar.update(1)
            window.append(logs)

            # ---- log, validate, checkpoint
            if st["step"] % args.log_every == 0 or st["step"] == args.max_steps:
                now = time.time()
                row = dict(mean_logs(window), step=st["step"], lr=lr, bad_steps=st["bad_steps"],
                           samples_per_s=len(window) * B / max(now - t_last, 1e-9))
                metrics.write(row)
                if "loss" in row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
                window, t_last = [], now
            if dev_loader is not None and st["step"] % args.eval_every == 0:
                stop = _validate_and_keep_best(model, dev_loader, world, autocast, st, args, metrics, say, rank)
                validated_at = st["step"]
            if st["step"] % args.save_every == 0 or pending_save:
                if st["bad_in_row"] == 0:
                    runtime.save_checkpoint(model, opt, sched, st, args, rank, world, meta)
                    saved_at, pending_save = st["step"], False
                else:  # the weights are those of the streak's start, but this position may never be good again
                    pending_save = True
            if args.stop_after_steps and steps_run == args.stop_after_steps:
                bar.close()
                say(f"--stop-after-steps {args.stop_after_steps}: stopping at step {st['step']} without a checkpoint")
                return dict(st, stopped="stop_after_steps")
        if st["step_in_epoch"] >= len(order) // B:
            st["epoch"] += 1
            st["step_in_epoch"] = 0
    bar.close()
    if dev_loader is not None and validated_at != st["step"] and stop is None:
        _validate_and_keep_best(model, dev_loader, world, autocast, st, args, metrics, say, rank)
    if saved_at != st["step"]:
        if st["bad_in_row"] == 0:
            runtime.save_checkpoint(model, opt, sched, st, args, rank, world, meta)
        else:
            say(f"not saving at the end: the last {st['bad_in_row']} steps were non-finite; the last checkpoint "
                f"is from step {saved_at}")
    end = dict(st, event="end", stopped=stop or "max_steps", bad_lines=bad_lines,
               max_param_diff_across_ranks=runtime.max_rank_divergence(params, world))
    metrics.write(end)
    if rank == 0:
        runtime.clean_temporaries(out_dir, runtime.OWN_FILES)
    c = st["counts"]
    say(f"done at step {st['step']} ({end['stopped']}); {st['bad_steps']} skipped steps; data: {bad_lines} bad "
        f"manifest line(s) skipped, {c['bad_audio']} unreadable clip read(s) skipped, {c['truncated']} clip(s) cut "
        f"to Whisper's window" + (f", {st['empty_steps']} step(s) without any readable clip" if st["empty_steps"]
                                   else "") + f"; weights in {os.path.join(out_dir, runtime.LAST)}"
        + (f", best (acc {st['best_acc']:.4f} at step {st['best_step']}) in {os.path.join(out_dir, runtime.BEST)}"
           if st["best_acc"] is not None else ""))
    return end


class Diverged(data.UserError, FloatingPointError):
    """--max-bad-steps non-finite steps in a row."""


def _validate_and_keep_best(model, loader, world, autocast, st, args, metrics, say, rank):
    """Validate; a strictly better accuracy is the new best (saved to best.safetensors); --patience
    validations in a row without one stop the run (returns "early_stop")."""
    res = validate(model, loader, world, autocast)
    if st["best_acc"] is None or res["acc"] > st["best_acc"]:
        st.update(best_acc=res["acc"], best_step=st["step"], since_best=0)
        if rank == 0:
            runtime.save_weights(model, os.path.join(args.output_dir, runtime.BEST))
    else:
        st["since_best"] += 1
    metrics.write(dict(split="dev", step=st["step"], **res, best_acc=st["best_acc"], since_best=st["since_best"]))
    say(f"\nstep {st['step']}: dev acc {res['acc']:.4f} loss {res['loss']:.4f} (best {st['best_acc']:.4f} at step "
        f"{st['best_step']}; {st['since_best']} without a new best)")
    if args.patience > 0 and st["since_best"] >= args.patience:
        say(f"early stop: {args.patience} validations without a new best accuracy")
        return "early_stop"
    return None






# ----------------------------------------------------------------------------- command line






