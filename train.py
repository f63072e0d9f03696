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
in them through skip_batch() instead, once for each micro-batch it skips, so every rank runs the same collectives.

Optimiser (paper appendix A.1, SALMONN): AdamW(beta1 0.9, beta2 0.999, eps 1e-8), weight decay 0.05 on
weight matrices only (biases, norms and other 1-d parameters have none); only trainable parameters.
Learning rate at step s (0-based), SALMONN's linear warm-up + cosine schedule, made per-step:
    lr(s) = lr_0 + (lr_max - lr_0) * s / S_w                                     s <  S_w
    lr(s) = lr_min + (lr_max - lr_min) * (1 + cos(pi * (s - S_w) / (S - S_w))) / 2     S_w <= s <= S
lr_0 = --warmup-start-lr 1e-6, lr_max = --lr 3e-5, lr_min = --min-lr 1e-5, S_w = --warmup-steps,
S = --max-steps.

Bad steps (the same on every rank). A step with a non-finite loss or gradient norm is skipped (gradients zeroed,
no update; the step still counts: its data is consumed and the schedule moves on); a step whose update multiplies
the norm of the trainable weights by more than --max-weight-growth over the last good step's is bad too (the
weights blow up a step before the loss turns non-finite; such an update is not undone, so every later step stays
bad until the run stops). Bad steps are counted ("bad_steps" in the metrics); no checkpoint is written during a
streak of them (a due one waits for the next good step), so checkpoint.pt and last.safetensors always hold weights
from before the streak; --max-bad-steps in a row stop the run with an error naming that checkpoint, and a run that
reaches --max-steps inside a streak stops with the same error instead of saving its final weights.

Resume (--resume), the output folder (args.json, metrics.jsonl, checkpoint.pt, last/best.safetensors) and what
a dead or stuck rank does: runtime.py.

The objective is an nn.Module (Objective below is stage 1's; joint_train.AlignedObjective extends it):
    forward(batch)  -> dict of scalar tensors: "loss" is minimised; every entry is logged, as the mean over
                       micro-batches and ranks, except keys starting with "n_" (counts), which are summed
    evaluate(batch) -> dict with "loss", "n_correct", "n_tokens" (validation, no gradient)
    skip_batch()    -> None: take part in forward()'s collectives for a micro-batch with no readable item
                       (nothing to do for an objective without any)
    save_trainable(path)                 weights for the next stage
    enable_gradient_checkpointing()
"""
import math
import os
import random
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

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
    g.add_argument("--seed", type=runtime.COUNT, default=42, help="initialisation, data order and dropout")
    g.add_argument("--lr", type=runtime.POSITIVE, default=3e-5, help="peak learning rate")
    g.add_argument("--warmup-start-lr", type=runtime.NON_NEGATIVE, default=1e-6, help="learning rate at step 0")
    g.add_argument("--min-lr", type=runtime.NON_NEGATIVE, default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=runtime.COUNT, default=warmup_steps, help="linear warm-up steps")
    g.add_argument("--max-steps", type=runtime.POSITIVE_INT, default=max_steps,
                   help="optimiser steps" + ("" if not validation else
                                            " at most (cosine horizon; early stopping usually ends sooner)"))
    g.add_argument("--weight-decay", type=runtime.NON_NEGATIVE, default=0.05, help="AdamW weight decay (not on biases/norms/1-d)")
    g.add_argument("--adam-betas", type=runtime.Range(float, ge=0, lt=1), nargs=2, default=[0.9, 0.999])
    g.add_argument("--adam-eps", type=runtime.POSITIVE, default=1e-8)
    g.add_argument("--batch-size", type=runtime.POSITIVE_INT, default=32,
                   help="GLOBAL batch = per-device batch x grad accumulation x number of processes")
    g.add_argument("--per-device-batch-size", type=runtime.POSITIVE_INT, default=None,
                   help="micro-batch per process (None: batch-size / (grad-accum x processes))")
    g.add_argument("--grad-accum", type=runtime.POSITIVE_INT, default=None,
                   help="micro-batches accumulated per step (None: batch-size / (per-device x processes))")
    g.add_argument("--grad-clip", type=runtime.NON_NEGATIVE, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="autocast dtype of the forward (paper: bf16; float32 = no autocast)")
    g.add_argument("--save-every", type=runtime.POSITIVE_INT, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=runtime.POSITIVE_INT, default=10, help="write a metrics.jsonl row every N steps")
    g.add_argument("--num-workers", type=runtime.COUNT, default=4, help="DataLoader worker processes per rank")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip broken manifest lines and unreadable audio instead of stopping (both are counted)")
    g.add_argument("--max-bad-steps", type=runtime.POSITIVE_INT, default=5,
                   help="stop after this many bad steps in a row (non-finite, or --max-weight-growth exceeded)")
    g.add_argument("--max-weight-growth", type=runtime.Range(float, gt=1), default=2.0,
                   help="a step whose update multiplies the norm of the trainable weights by more than this (over the "
                        "last good step's) is bad: the weights are blowing up before the loss turns non-finite. An "
                        "AdamW step moves each weight by about --lr, so a sane run grows the norm by well under 1%% per "
                        "step")
    g.add_argument("--dist-timeout", type=runtime.POSITIVE, default=60.0, metavar="MINUTES",
                   help="torchrun: a collective that waits longer than this for another process ends the run with an "
                        "error (a dead or stuck rank) instead of hanging. Long enough for the slowest rank to load a "
                        "13B model from a shared filesystem and for a checkpoint write or a validation pass, which "
                        "the other ranks wait for")
    g.add_argument("--instructions", default=None,
                   help="JSON file of alternative instructions per task, one drawn per item: this project's format "
                        "or SALMONN's prompts/train_prompt.json (data.Instructions; None: the fixed ones)")
    g.add_argument("--stop-after-steps", type=runtime.COUNT, default=0,
                   help="testing: stop after N steps of this run WITHOUT a checkpoint, as a kill would (0: off)")
    if validation:
        g.add_argument("--dev", default=None, help="dev manifest: validation (teacher-forced accuracy and loss)")
        g.add_argument("--eval-every", type=runtime.POSITIVE_INT, default=3000, help="validate every N steps")
        g.add_argument("--patience", type=runtime.COUNT, default=4,
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

    def skip_batch(self):
        """A skipped micro-batch: stage 1's forward runs no collective, so there is nothing to take part in."""

    def save_trainable(self, path):
        self.lsm.save_trainable(path)

    def enable_gradient_checkpointing(self):
        """Recompute the LLM decoder layers in backward (non-reentrant: the dropout masks are replayed)."""
        causal, kw = self.lsm.causal_lm, {"use_reentrant": False}
        if hasattr(causal, "activation_checkpointing_enable"):  # later 5.x; 5.0 has only gradient_checkpointing_enable
            causal.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# ----------------------------------------------------------------------------- the loop


COUNTS = ("bad_audio", "truncated")  # per-batch counts of data.Collator, summed over workers, ranks and steps


def train(args, model, train_set, collate, *, sizes=None, weights=None, epoch_size=None, dev_set=None, bad_lines=0):
    """Train `model` (the objective, see the module docstring) on `train_set` (items indexed like the
    concatenation of sources with `sizes`, mixed with `weights`; default: one source, weight 1).
    bad_lines: manifest lines the caller skipped (--skip-bad), for the record.
    Returns a summary dict (step, bad_steps, best validation, ...)."""
    sizes, weights = sizes or [len(train_set)], weights or [1.0]
    if sum(sizes) != len(train_set):
        raise ValueError(f"train(): source sizes {sizes} do not add up to the {len(train_set)} training items")
    with runtime.folder_lock(args.output_dir), runtime.process_group(args.dist_timeout) as (rank, world, device):
        return training_loop(args, model, train_set, collate, sizes, weights, epoch_size, dev_set, bad_lines, rank,
                             world, device)


def training_loop(args, model, train_set, collate, sizes, weights, epoch_size, dev_set, bad_lines, rank, world,
                  device):
    """The loop: epochs of steps; after each step its log row, and the validation and checkpoint when due."""
    print0 = print if rank == 0 else (lambda *a, **kw: None)
    run, opt, sched, progress, metrics = start(args, model, sizes, rank, world, device, print0)
    B, b, k = args.batch_size, run.micro_batch, run.grad_accum  # the global batch B = b x k x world
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    # workers start once per run (not per epoch and validation); pinned batches reach the GPU by non-blocking copies
    loader_kw = dict(collate_fn=collate, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.num_workers > 0)
    dev_loader = None if dev_set is None else DataLoader(
        dev_set, batch_sampler=dev_batches(len(dev_set), b, rank, world), **loader_kw)
    epoch_batches = EpochBatches()
    train_loader = DataLoader(train_set, batch_sampler=epoch_batches, **loader_kw)
    print0(f"training: {len(train_set)} items, global batch {B} = {b} per device x {k} accumulation x {world} "
           f"process(es) on {device}, {sum(p.numel() for p in params):,} trainable parameters, steps "
           f"{progress['step']} -> {args.max_steps}")
    log, first_step, pending_save = StepLog(args, metrics, progress, rank), progress["step"], False
    validated_at = progress["step"] if run.resumed else None
    stop = None  # or "early_stop": --patience validations in a row without a new best (a resumed run may be there)
    if dev_loader is not None and 0 < args.patience <= progress["since_best"]:
        stop = "early_stop"
    while stop is None and progress["step"] < args.max_steps:
        order = epoch_order(sizes, weights, epoch_size or sum(sizes), args.seed, progress["epoch"])
        if len(order) < B:
            raise data.UserError(f"an epoch has {len(order)} items, fewer than one global batch (--batch-size {B})")
        epoch_batches.batches = rank_micro_batches(order, progress["step_in_epoch"], B, b, k, rank)
        batches = iter(train_loader)
        while stop is None and progress["step"] < args.max_steps and progress["step_in_epoch"] < len(order) // B:
            lr = opt.param_groups[0]["lr"]
            logs = train_step(model, opt, params, [next(batches) for _ in range(k)], progress["step"], args, rank,
                              world, autocast)
            count_step(logs, progress, args, run, print0)  # raises Diverged after --max-bad-steps bad steps
            sched.step()
            progress.update(step=progress["step"] + 1, step_in_epoch=progress["step_in_epoch"] + 1)
            log.add(logs, lr, progress)  # a metrics.jsonl row every --log-every steps
            if dev_loader is not None and progress["step"] % args.eval_every == 0:
                stop = validate_and_keep_best(model, dev_loader, world, autocast, progress, args, metrics, run, print0)
                validated_at = progress["step"]
            if progress["step"] % args.save_every == 0 or pending_save:
                pending_save = progress["bad_in_row"] > 0  # a checkpoint due in a streak of bad steps waits for its end
                if not pending_save:
                    run.save(model, opt, sched, progress)
            if args.stop_after_steps and progress["step"] == first_step + args.stop_after_steps:
                log.close()
                print0(f"--stop-after-steps {args.stop_after_steps}: stopping at step {progress['step']} without a "
                       f"checkpoint")
                return dict(progress, stopped="stop_after_steps")
        if progress["step_in_epoch"] >= len(order) // B:
            progress.update(epoch=progress["epoch"] + 1, step_in_epoch=0)
    log.close()
    if dev_loader is not None and validated_at != progress["step"] and stop is None:
        validate_and_keep_best(model, dev_loader, world, autocast, progress, args, metrics, run, print0)
    if run.saved_at != progress["step"] and progress["bad_in_row"] == 0:
        run.save(model, opt, sched, progress)
    if run.saved_at != progress["step"]:  # the run ends inside a streak of bad steps: no final weights
        metrics.write(dict(progress, event="end", stopped="bad_steps", bad_lines=bad_lines))
        run.close()
        raise Diverged(f"the run ended inside a streak of {progress['bad_in_row']} bad step(s) (last: step "
                       f"{progress['step'] - 1}), so it wrote no final weights: " + kept(run))
    end = dict(progress, event="end", stopped=stop or "max_steps", bad_lines=bad_lines,
               max_param_diff_across_ranks=runtime.max_rank_divergence(params, world))
    metrics.write(end)
    run.close()
    print0(summary(end, args.output_dir))
    return end


def start(args, model, sizes, rank, world, device, print0):
    """The run folder (runtime.RunFolder: on --resume the checkpoint is read and checked), the model on `device`,
    AdamW and its schedule, and the progress of the run: fresh, or the checkpoint's (whose settings the optimizer then
    follows, or this run's changed ones with --resume-changes apply). -> run, opt, sched, progress, metrics."""
    run = runtime.RunFolder(args, sizes, rank, world, print0)
    model.to(device).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    opt, sched = build_optimizer(model, args)
    progress = dict(step=0, epoch=0, step_in_epoch=0, bad_steps=0, bad_in_row=0, best_acc=None, best_step=None,
                    since_best=0, empty_steps=0, counts={c: 0 for c in COUNTS}, weight_norm=None,
                    dev_bad_audio=None)
    if run.resume(model, opt, sched, progress):
        apply_settings(opt, sched, args, progress["step"])
    if progress["weight_norm"] is None:  # the reference of count_step's growth check
        progress["weight_norm"] = weight_norm([p for p in model.parameters() if p.requires_grad])
    metrics = run.open_records(progress)  # args.json, metrics.jsonl
    runtime.broadcast_parameters([p for p in model.parameters() if p.requires_grad], world)
    return run, opt, sched, progress, metrics


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
            model.skip_batch()  # the collectives this micro-batch's forward would have run
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
    logs["weight_norm"] = weight_norm(params)
    return logs


def weight_norm(params):
    """The L2 norm of all trainable parameters together (float64: weights of 1e30 do not overflow it)."""
    return torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in params]).norm().item()


def count_step(logs, progress, args, run, print0):
    """Add a step's data counts to progress, and count a step with no readable item (no update) and a bad one:
    non-finite (skipped by train_step), or one whose update grew the trainable weights' norm more than
    --max-weight-growth fold over the last good step's (an update that blows the weights up while the loss is still
    finite: the loss turns non-finite only a step later, so a checkpoint written in between would hold the damage).
    No checkpoint is written during a streak of bad steps; --max-bad-steps of them in a row raise Diverged, naming
    the last checkpoint, which is from before them."""
    for c in COUNTS:
        progress["counts"][c] += logs[f"n_{c}"]
    if logs.pop("empty"):
        progress["empty_steps"] += 1
        print0(f"\nstep {progress['step']}: no readable audio in the whole batch: no update")
    skipped, norm, ref = logs.pop("skipped"), logs.get("weight_norm"), progress["weight_norm"]
    exploded = not skipped and norm is not None and not (norm <= args.max_weight_growth * ref or ref == 0)
    if not skipped and not exploded:
        if "loss" in logs:
            progress.update(bad_in_row=0, weight_norm=norm)
        return
    progress["bad_steps"] += 1
    progress["bad_in_row"] += 1
    why = (f"non-finite loss {logs['loss']} / gradient norm {logs['grad_norm']}: skipped" if skipped else
           f"the update grew the trainable weights' norm from {ref:.4g} (last good step) to {norm:.4g}, more than "
           f"--max-weight-growth {args.max_weight_growth:g} fold")
    print0(f"\nstep {progress['step']}: {why} ({progress['bad_in_row']} bad in a row, {progress['bad_steps']} in "
           f"total; no checkpoint until a good step)")
    if progress["bad_in_row"] >= args.max_bad_steps:
        raise Diverged(f"{progress['bad_in_row']} bad steps in a row (last: step {progress['step']}, {why}) reached "
                       f"--max-bad-steps {args.max_bad_steps}; stopping without saving. " + kept(run))


def kept(run):
    """Where a diverged run can continue from, and how."""
    if run.saved_at is None:
        return "No checkpoint was written before the bad steps: start again with a lower --lr."
    return (f"The last good checkpoint, written before the bad steps: {run.path} (step {run.saved_at}; "
            f"{runtime.LAST} holds the same weights). Continue from it with --resume --resume-changes apply and a "
            f"lower --lr (or --grad-clip 1.0, or --dtype float32).")


class Diverged(data.UserError, FloatingPointError):
    """--max-bad-steps bad steps in a row, or a run that ends inside a streak of them."""


def validate_and_keep_best(model, loader, world, autocast, progress, args, metrics, run, print0):
    """Validate; a strictly better accuracy is the new best (saved to best.safetensors); --patience
    validations in a row without one stop the run (returns "early_stop"). A dev set with nothing readable, or
    whose unreadable clips change between validations, stops the run (check_dev)."""
    res = validate(model, loader, world, autocast)
    check_dev(res, progress)
    if progress["best_acc"] is None or res["acc"] > progress["best_acc"]:
        progress.update(best_acc=res["acc"], best_step=progress["step"], since_best=0)
        run.save_best(model)
    else:
        progress["since_best"] += 1
    metrics.write(dict(split="dev", step=progress["step"], **res, best_acc=progress["best_acc"],
                       since_best=progress["since_best"]))
    print0(f"\nstep {progress['step']}: dev acc {res['acc']:.4f} loss {res['loss']:.4f} (best "
           f"{progress['best_acc']:.4f} at step {progress['best_step']}; {progress['since_best']} without a new best)")
    if args.patience > 0 and progress["since_best"] >= args.patience:
        print0(f"early stop: {args.patience} validations without a new best accuracy")
        return "early_stop"
    return None


def check_dev(res, progress):
    """Validation compares accuracies over the same dev items every time, or stops the run: with no readable dev
    item the accuracy is 0 / 0 (NaN, which would decide early stopping by NaN comparisons), and a changing number of
    unreadable clips (--skip-bad; a flaky file system) would compare accuracies over different sets. The count of
    the first validation is kept in progress["dev_bad_audio"] (and in the checkpoint)."""
    if res["n_tokens"] == 0:
        raise DevSetError(f"--dev: no dev item could be read ({res['n_bad_audio']} unreadable clip(s)), so there is "
                          f"no accuracy to validate with; fix the dev manifest or its audio")
    first = progress.get("dev_bad_audio")
    if first is not None and first != res["n_bad_audio"]:
        raise DevSetError(f"--dev: {res['n_bad_audio']} dev clip(s) were unreadable in this validation, {first} in "
                          f"the first: the accuracies would be over different dev sets; fix the audio (or the file "
                          f"system) and resume")
    progress["dev_bad_audio"] = res["n_bad_audio"]


class DevSetError(data.UserError):
    """The dev set cannot give comparable accuracies."""


def summary(end, out_dir):
    """The run's last line: where it stopped, what was skipped, where the weights are."""
    c = end["counts"]
    return (f"done at step {end['step']} ({end['stopped']}); {end['bad_steps']} skipped steps; data: "
            f"{end['bad_lines']} bad manifest line(s) skipped, {c['bad_audio']} unreadable clip read(s) skipped, "
            f"{c['truncated']} clip(s) cut to Whisper's window"
            + (f", {end['empty_steps']} step(s) without any readable clip" if end["empty_steps"] else "")
            + (f", {end['dev_bad_audio']} unreadable dev clip(s) left out of every validation"
               if end.get("dev_bad_audio") else "")
            + f"; weights in {os.path.join(out_dir, runtime.LAST)}"
            + (f", best (acc {end['best_acc']:.4f} at step {end['best_step']}) in {os.path.join(out_dir, runtime.BEST)}"
               if end["best_acc"] is not None else ""))


# ----------------------------------------------------------------------------- schedule and optimizer


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


# ----------------------------------------------------------------------------- data order


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


class EpochBatches:
    """The training DataLoader's batch sampler: the micro-batches of the current epoch, set before each pass (the
    DataLoader iterates it in the main process, so its persistent workers serve every epoch)."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def micro_seed(seed, step, index):
    return random.Random(f"{seed}:{step}:{index}").getrandbits(63)


def dev_batches(n, b, rank, world):
    """Validation: rank `rank` of `world` takes the items rank, rank + world, ... in batches of b (validation sums
    over all items, so how they are split does not matter)."""
    items = list(range(n))[rank::world]
    return [items[i:i + b] for i in range(0, len(items), b)]


# ----------------------------------------------------------------------------- validation and logs


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


class StepLog:
    """The training rows of metrics.jsonl (every --log-every steps and at --max-steps: means over those steps,
    mean_logs; the lr of the last one; samples per second) and the progress bar."""

    def __init__(self, args, metrics, progress, rank):
        self.args, self.metrics, self.window, self.t_last = args, metrics, [], time.time()
        self.bar = tqdm(total=args.max_steps, initial=progress["step"], disable=rank != 0, dynamic_ncols=True,
                        desc="train")

    def add(self, logs, lr, progress):
        self.bar.update(1)
        self.window.append(logs)
        if progress["step"] % self.args.log_every and progress["step"] != self.args.max_steps:
            return
        now = time.time()
        row = dict(mean_logs(self.window), step=progress["step"], lr=lr, bad_steps=progress["bad_steps"],
                   samples_per_s=len(self.window) * self.args.batch_size / max(now - self.t_last, 1e-9))
        self.metrics.write(row)
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        self.window, self.t_last = [], now

    def close(self):
        self.bar.close()
