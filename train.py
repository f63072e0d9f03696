"""The one training loop of AI-STA, shared by stage 1 (pretrain.py) and stage 3 (joint_train.py).

Plain PyTorch: run with `python` (one process) or `torchrun --nproc_per_node N` (DistributedDataParallel over
the trainable parameters; nccl on CUDA, gloo on CPU). Every rank loads the frozen encoders and LLM itself.

Batches. --batch-size is the GLOBAL batch B (paper: 32) = b x k x W, with b = --per-device-batch-size,
k = --grad-accum and W = the number of processes. Each epoch has one global order of the training items, a
function of (--seed, epoch) only (data.WeightedMixSampler: the weighted mixture of the manifests; one
manifest = a shuffle). Step s of an epoch takes the items order[s*B : (s+1)*B] and cuts them into W*k
micro-batches of b consecutive items; rank r runs micro-batches r*k .. r*k + k - 1. Hence
  * a step's gradient is the mean over its W*k micro-batch losses for any factorisation of B (DDP averages
    over ranks, accumulation divides by k), up to the order of the float additions: 2 ranks x 1 micro-batch
    give exactly the weights of 1 rank x 2 accumulated micro-batches (tests/test_train.py).
    (DistributedSampler's strided split would group different items into a micro-batch for different W.)
  * the data position is (epoch, step in epoch): --resume skips the consumed batches without reading them.
Dropout: torch's RNG is reseeded before every micro-batch from (seed, step, micro-batch index in the global
batch), so dropout masks depend neither on W and k nor on where a run was resumed.

Optimiser (paper appendix A.1, SALMONN): AdamW(beta1 0.9, beta2 0.999, eps 1e-8), weight decay 0.05 on
weight matrices only (biases, norms and other 1-d parameters have none); only trainable parameters.
Learning rate at step s (0-based), SALMONN's linear warm-up + cosine schedule, made per-step:
    lr(s) = lr_0 + (lr_max - lr_0) * s / S_w                                     s <  S_w
    lr(s) = lr_min + (lr_max - lr_min) * (1 + cos(pi * (s - S_w) / (S - S_w))) / 2     S_w <= s <= S
lr_0 = --warmup-start-lr 1e-6, lr_max = --lr 3e-5, lr_min = --min-lr 1e-5, S_w = --warmup-steps,
S = --max-steps.

Non-finite loss or gradient norm (both are all-reduced, so every rank sees the same): the step is skipped
on all ranks (gradients zeroed, no update; the step still counts: its data is consumed and the schedule
moves on) and counted ("bad_steps" in the metrics); --max-bad-steps in a row stop the run with an error,
without writing a checkpoint, so the last good one stays intact.

Output folder (--output-dir): args.json; metrics.jsonl (one JSON object per --log-every steps: "step" = steps
done, means over those steps of the objective's values, "lr" of the last one, "grad_norm", "samples_per_s",
"bad_steps"; one per validation with "split": "dev"; an "end" record); checkpoint.pt (full training state for --resume: trainable parameters, optimiser,
scheduler, step, data position, per-rank RNG states, early-stopping state); last.safetensors (+ .json:
LSM.save_trainable, the next stage's --init); best.safetensors (with a dev set: best validation
accuracy). Every file is written under a temporary name and renamed (os.replace): a kill never leaves a
half-written file.

The objective is an nn.Module (Objective below is stage 1's; joint_train.Joint extends it):
    forward(batch)  -> dict of scalar tensors: "loss" is minimised; every entry is logged, as the mean over
                       micro-batches and ranks, except keys starting with "n_" (counts), which are summed
    evaluate(batch) -> dict with "loss", "n_correct", "n_tokens" (validation, no gradient)
    save_trainable(path)                 weights for the next stage
    enable_gradient_checkpointing()
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

import data

CHECKPOINT, LAST, BEST, METRICS, ARGS = "checkpoint.pt", "last.safetensors", "best.safetensors", "metrics.jsonl", "args.json"


# ----------------------------------------------------------------------------- flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default, also for flags defined without a
    help text (argparse shows defaults only inside help texts)."""

    def add_argument(self, action):
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)


def add_train_args(parser, *, warmup_steps, max_steps, validation=False):
    """Training flags with the paper's defaults (stage 1: warmup 9000, 80000 steps; stage 3: warmup 3000)."""
    g = parser.add_argument_group("training (paper appendix A.1)")
    g.add_argument("--output-dir", required=True, help="run folder: args, metrics, checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue from <output-dir>/checkpoint.pt (starts fresh if there is none yet)")
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
    g.add_argument("--instructions", default=None,
                   help="JSON file of alternative instructions per task (data.Instructions; None: the fixed ones)")
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
            raise ValueError(f"--train {spec}: the sampling weight must be >= 0")
    return out


def note_init_overrides(parser):
    """Say in --help that with --init the model flags come from the checkpoint unless given."""
    for group in parser._action_groups:
        if group.title == "model":
            group.description = ("the model is rebuilt from --init's .json; a model flag given on the command line "
                                 "overrides it (the defaults below apply only to a fresh model)")
    return parser


def model_overrides(make_parser, argv, args):
    """The model flags given on the command line (even if equal to their defaults), as LSM constructor arguments:
    they override what a checkpoint's .json says (e.g. --llm-dtype float32, or a moved --llm folder)."""
    p = make_parser()
    for action in p._actions:  # parse again with no defaults: only the given flags land in the namespace
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_known_args(argv)[0]))
    names = ["whisper", "beats", "llm", "llm_dtype", "template", "speech_tokens", "second_per_window",
             "qformer_layers", "qformer_hidden", "qformer_heads", "qformer_ffn", "lora_r", "lora_alpha",
             "lora_dropout", "lora_targets"]
    out = {n: getattr(args, n) for n in names if n in given}
    if args.no_beats:
        out["beats"] = None
    return out


# ----------------------------------------------------------------------------- the stage-1 objective


class Objective(nn.Module):
    """Stage 1 (paper eq. 2): L_CE = -sum_m log P(T_m | T_<m, E^S, I; theta), the mean over target tokens."""

    def __init__(self, lsm):
        super().__init__()
        lsm.check_training_precision()  # no float16 training (model.py says why)
        self.lsm = lsm

    def forward(self, batch):
        out = self.lsm.speech_forward(batch)
        return dict(loss=out["loss"], ce=out["loss"].detach(), n_correct=out["n_correct"], n_tokens=out["n_tokens"])

    @torch.no_grad()
    def evaluate(self, batch):
        out = self.lsm.speech_forward(batch)
        return dict(loss=out["loss"], n_correct=out["n_correct"], n_tokens=out["n_tokens"])

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


def init_distributed():
    """-> (rank, world_size, device). Starts the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


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
        raise ValueError(f"--batch-size {B} (global) must equal --per-device-batch-size x --grad-accum x number of "
                         f"processes ({world}); got --per-device-batch-size {args.per_device_batch_size} and "
                         f"--grad-accum {args.grad_accum}")
    return b, k


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


def rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]], python=random.getstate())


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def atomic(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def save_weights(model, path):
    """model.save_trainable writes path and path.json; both atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_trainable(tmp)
    os.replace(tmp + ".json", path + ".json")
    os.replace(tmp, path)


def all_reduce(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def max_rank_divergence(params, world):
    """max |p - p_on_rank_0| over the trainable parameters and ranks (0.0 when DDP keeps the replicas equal)."""
    if world == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


class Metrics:
    """metrics.jsonl writer (rank 0). On --resume, rows past the checkpoint's step (from the killed run) are dropped."""

    def __init__(self, folder, rank, resume_step=None):
        self.path, self.rank = os.path.join(folder, METRICS), rank
        if rank == 0 and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            atomic(self.path, lambda p: write_text(p, "".join(keep)))

    def write(self, row):
        """Append one row; non-finite numbers become null (strict JSON)."""
        if self.rank == 0:
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


@torch.no_grad()
def validate(model, loader, world, autocast):
    """Teacher-forced next-token accuracy and loss of the target over the dev set (all ranks together):
    acc = sum n_correct / sum n_tokens, loss = token-weighted mean cross-entropy."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64)  # loss * n_tokens, n_correct, n_tokens
    for batch in loader:
        if batch is None:
            continue
        with autocast():
            out = model.evaluate(batch)
        n = out["n_tokens"].double().cpu()
        tot += torch.stack([out["loss"].double().cpu() * n, out["n_correct"].double().cpu(), n])
    model.train()
    tot = all_reduce(tot.to(_reduce_device(model)), world).cpu()
    return dict(loss=(tot[0] / tot[2]).item(), acc=(tot[1] / tot[2]).item(), n_tokens=int(tot[2]))


def _reduce_device(model):
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    return next(model.parameters()).device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


# ----------------------------------------------------------------------------- the loop


def take(batches, k, last, step):
    """The next k micro-batches of this rank as (batch, weight) pairs. A micro-batch with no readable audio
    (None under --skip-bad) is replaced by the previous one with weight 0, so every rank still runs the same
    forward/backward collectives."""
    out = []
    for _ in range(k):
        batch, weight = next(batches), 1.0
        if batch is None:
            if last[0] is None:
                raise RuntimeError(f"step {step}: the first micro-batch has no readable audio")
            batch, weight = last[0], 0.0
        last[0] = batch
        out.append((batch, weight))
    return out


def train_step(ddp, opt, params, micro, step, args, rank, world, autocast):
    """One optimiser step over this rank's micro-batches [(batch, weight)]: the loss of each is divided by
    k = len(micro) and back-propagated (DDP all-reduces the gradient sum on the last one, averaging over
    ranks), then one all-reduce of the logged values and the gradient norm; the update is applied only if
    both the loss and the gradient norm are finite. Returns the logs (identical on every rank) with
    "skipped" = the step was not applied."""
    k = len(micro)
    opt.zero_grad(set_to_none=True)
    sums = {}
    for j, (batch, weight) in enumerate(micro):
        torch.manual_seed(micro_seed(args.seed, step, rank * k + j))  # dropout independent of world size
        with ddp.no_sync() if world > 1 and j < k - 1 else contextlib.nullcontext():
            with autocast():
                out = ddp(batch)
            (out["loss"] * weight / k).backward()
        for key, v in out.items():
            sums[key] = sums.get(key, 0.0) + v.detach().double().cpu()
    grad_norm = nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    keys = sorted(sums)
    vec = torch.stack([sums[key] for key in keys] + [grad_norm.detach().double().cpu()])
    vec = all_reduce(vec.to(_reduce_device(ddp)), world).cpu()
    logs = {key: (v if key.startswith("n_") else v / (world * k)).item() for key, v in zip(keys, vec)}
    logs["grad_norm"] = vec[-1].item() / world  # the same on every rank (DDP all-reduced the gradients)
    logs["skipped"] = not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]))
    if logs["skipped"]:
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    return logs


def mean_logs(rows):
    """Average step logs over a logging window (counts n_* summed); acc = n_correct / n_tokens if present."""
    out = {key: sum(r[key] for r in rows) / (1 if key.startswith("n_") else len(rows)) for key in rows[0]}
    if out.get("n_tokens"):
        out["acc"] = out["n_correct"] / out["n_tokens"]
    return out


def train(args, model, train_set, collate, *, sizes=None, weights=None, epoch_size=None, dev_set=None):
    """Train `model` (the objective, see the module docstring) on `train_set` (items indexed like the
    concatenation of sources with `sizes`, mixed with `weights`; default: one source, weight 1).
    Returns a summary dict (step, bad_steps, best validation, ...)."""
    rank, world, device = init_distributed()
    try:
        return _train(args, model, train_set, collate, sizes or [len(train_set)], weights or [1.0],
                      epoch_size, dev_set, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, model, train_set, collate, sizes, weights, epoch_size, dev_set, rank, world, device):
    from tqdm import tqdm
    b, k = batch_layout(args, world)
    B, out_dir = args.batch_size, args.output_dir
    say = print if rank == 0 else (lambda *a, **kw: None)
    if sum(sizes) != len(train_set):
        raise ValueError(f"train(): source sizes {sizes} do not add up to the {len(train_set)} training items")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    if os.path.exists(ckpt_path) and not args.resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or another --output-dir")

    model.to(device).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = build_optimizer(model, args)
    st = dict(step=0, epoch=0, step_in_epoch=0, bad_steps=0, bad_in_row=0, best_acc=None, best_step=None,
              since_best=0)
    resumed = args.resume and os.path.exists(ckpt_path)
    if resumed:
        _load_checkpoint(ckpt_path, model, opt, sched, st, args, rank, world)
        say(f"resumed {ckpt_path} at step {st['step']} (epoch {st['epoch']}, step {st['step_in_epoch']} of it)")
    elif args.resume:
        say(f"--resume: no {ckpt_path} yet, starting from scratch")
    if rank == 0:
        atomic(os.path.join(out_dir, ARGS), lambda p: write_text(p, json.dumps(vars(args), indent=1)))
    metrics = Metrics(out_dir, rank, st["step"] if resumed else None)

    ddp = model
    if world > 1:
        # the frozen encoders and LLM come from the same files on every rank: no need to broadcast them
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
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
    window, t_last, steps_run, last, stop = [], time.time(), 0, [None], None
    validated_at = saved_at = st["step"] if resumed else None
    if dev_loader is not None and args.patience > 0 and st["since_best"] >= args.patience:
        stop = "early_stop"  # a resumed run that had already stopped early
    while stop is None and st["step"] < args.max_steps:
        order = epoch_order(sizes, weights, epoch_size or sum(sizes), args.seed, st["epoch"])
        if len(order) < B:
            raise ValueError(f"an epoch has {len(order)} items, fewer than one global batch (--batch-size {B})")
        micro = rank_micro_batches(order, st["step_in_epoch"], B, b, k, rank)
        batches = iter(DataLoader(train_set, batch_sampler=micro, **loader_kw))
        while stop is None and st["step"] < args.max_steps and st["step_in_epoch"] < len(order) // B:
            lr = opt.param_groups[0]["lr"]
            logs = train_step(ddp, opt, params, take(batches, k, last, st["step"]), st["step"], args, rank, world,
                              autocast)
            if logs.pop("skipped"):
                st["bad_steps"] += 1
                st["bad_in_row"] += 1
                say(f"\nstep {st['step']}: non-finite loss {logs['loss']} / gradient norm {logs['grad_norm']}: "
                    f"skipped ({st['bad_in_row']} in a row, {st['bad_steps']} in total)")
                if st["bad_in_row"] >= args.max_bad_steps:
                    raise FloatingPointError(
                        f"{st['bad_in_row']} non-finite steps in a row (last: step {st['step']}) reached "
                        f"--max-bad-steps {args.max_bad_steps}; stopping without saving. The last good checkpoint: "
                        + (f"{ckpt_path} (step {saved_at})." if saved_at is not None else "none yet.")
                        + " Try a lower --lr, --grad-clip 1.0 or --dtype float32.")
            else:
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
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
                window, t_last = [], now
            if dev_loader is not None and st["step"] % args.eval_every == 0:
                stop = _validate_and_keep_best(model, dev_loader, world, autocast, st, args, metrics, say, rank)
                validated_at = st["step"]
            if st["step"] % args.save_every == 0:
                _save(model, opt, sched, st, args, rank, world)
                saved_at = st["step"]
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
        _save(model, opt, sched, st, args, rank, world)
    end = dict(st, event="end", stopped=stop or "max_steps", max_param_diff_across_ranks=max_rank_divergence(params, world))
    metrics.write(end)
    say(f"done at step {st['step']} ({end['stopped']}); {st['bad_steps']} skipped steps; weights in "
        f"{os.path.join(out_dir, LAST)}" + (f", best (acc {st['best_acc']:.4f} at step {st['best_step']}) in "
                                            f"{os.path.join(out_dir, BEST)}" if st["best_acc"] is not None else ""))
    return end


def _validate_and_keep_best(model, loader, world, autocast, st, args, metrics, say, rank):
    """Validate; a strictly better accuracy is the new best (saved to best.safetensors); --patience
    validations in a row without one stop the run (returns "early_stop")."""
    res = validate(model, loader, world, autocast)
    if st["best_acc"] is None or res["acc"] > st["best_acc"]:
        st.update(best_acc=res["acc"], best_step=st["step"], since_best=0)
        if rank == 0:
            save_weights(model, os.path.join(args.output_dir, BEST))
    else:
        st["since_best"] += 1
    metrics.write(dict(split="dev", step=st["step"], **res, best_acc=st["best_acc"], since_best=st["since_best"]))
    say(f"\nstep {st['step']}: dev acc {res['acc']:.4f} loss {res['loss']:.4f} (best {st['best_acc']:.4f} at step "
        f"{st['best_step']}; {st['since_best']} without a new best)")
    if args.patience > 0 and st["since_best"] >= args.patience:
        say(f"early stop: {args.patience} validations without a new best accuracy")
        return "early_stop"
    return None


def _save(model, opt, sched, st, args, rank, world):
    """checkpoint.pt (everything --resume needs; RNG states of every rank) and last.safetensors, atomically."""
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    if rank == 0:
        state = dict(model={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                     optimizer=opt.state_dict(), scheduler=sched.state_dict(), state=dict(st), rng=rng,
                     world_size=world, batch_size=args.batch_size, seed=args.seed)
        save_weights(model, os.path.join(args.output_dir, LAST))
        atomic(os.path.join(args.output_dir, CHECKPOINT), lambda p: torch.save(state, p))
    if world > 1:
        dist.barrier()


def _load_checkpoint(path, model, opt, sched, st, args, rank, world):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for flag, key in (("--batch-size", "batch_size"), ("--seed", "seed")):
        if ck[key] != getattr(args, key):
            raise ValueError(f"--resume: {path} was written with {flag} {ck[key]}, this run has "
                             f"{getattr(args, key)}; the data position would not match")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(ck["model"]):
        raise ValueError(f"--resume: {path} holds other trainable parameters than this model "
                         f"(missing {sorted(set(own) - set(ck['model']))[:3]}, "
                         f"unexpected {sorted(set(ck['model']) - set(own))[:3]}): were the flags changed?")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(ck["model"][n])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    st.update(ck["state"])
    if ck["world_size"] == world:
        set_rng_state(ck["rng"][rank])
    elif rank == 0:
        print(f"--resume: {path} was written by {ck['world_size']} processes, this run has {world}: RNG states not "
              f"restored (dropout is reseeded per micro-batch, so training is unaffected)")
