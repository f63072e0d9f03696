"""What running a training or evaluation job needs besides the method: the command line's help and user errors,
the process group and the loop's collectives, atomic files and the temporary files a kill leaves, metrics rows,
and checkpoints with the record of what a resume may change. train.py and evaluate.py call these by name; none of
it is in the paper, so a reader of the method can skip this file.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist

import data

CHECKPOINT, LAST, BEST, METRICS, ARGS = "checkpoint.pt", "last.safetensors", "best.safetensors", "metrics.jsonl", "args.json"


# ----------------------------------------------------------------------------- command line: help texts, user errors

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default, also for flags defined without a
    help text (argparse shows defaults only inside help texts)."""

    def add_argument(self, action):
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)


def flag(name):
    return "--" + name.replace("_", "-")


USER_ERRORS = (data.UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def user_message(err):
    """The message of a user error; one raised in a DataLoader worker arrives wrapped by torch ("Caught X in
    DataLoader worker process N. Original Traceback ...": its last line is the original message)."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = [l for l in text.splitlines() if l.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return text


def cli(main, script=None):
    """Run a script's main() as a command: a user error (USER_ERRORS: a bad manifest, flag, path or checkpoint,
    a divergence stop, a failed collective) prints `<script>: error: <message>` on stderr, alone (under torchrun
    with the rank), and exits with status 1; any other exception is a bug and keeps its traceback."""
    script = script or os.path.basename(sys.argv[0])
    try:
        main()
    except USER_ERRORS as e:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"{script}: error: {f'[rank {rank}] ' if rank else ''}{user_message(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------- processes: the process group and the collectives of the loop

def init_distributed(timeout_minutes=60.0):
    """-> (rank, world_size, device). Starts the process group when launched by torchrun (WORLD_SIZE > 1), with a
    finite collective timeout (--dist-timeout): a dead or stuck rank ends the run with a message, not a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return (dist.get_rank() if world > 1 else 0), world, device


@contextlib.contextmanager
def process_group(timeout_minutes=60.0):
    """with process_group(--dist-timeout) as (rank, world, device): the body runs inside the process group
    (init_distributed); a collective that fails in it ends the run with a DistError saying what it means, and the
    group is destroyed on the way out."""
    rank, world, device = init_distributed(timeout_minutes)
    try:
        yield rank, world, device
    except RuntimeError as e:
        failure = collective_failure(e, rank, timeout_minutes) if world > 1 else None
        if failure is None:
            raise
        raise failure from None
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class DistError(data.UserError):
    """A collective failed: another rank is stuck past --dist-timeout, or died."""


def collective_failure(err, rank, timeout_minutes):
    """A RuntimeError raised by a collective -> DistError with what it means, or None if it is something else.
    gloo says 'Timed out waiting Nms' (this rank waited --dist-timeout for a peer) or 'Connection closed by peer'
    (a peer died, e.g. after its own timeout or error); nccl's watchdog aborts the process by itself."""
    text = str(err)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return DistError(f"rank {rank}: a collective did not complete within --dist-timeout {timeout_minutes:g} "
                         f"minutes: another process is stuck or dead (see its output). ({text.strip()[:300]})")
    if "closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
        return DistError(f"rank {rank}: lost the connection to another process, which ended (see its output for "
                         f"why). ({text.strip()[:300]})")
    return None


def all_reduce(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


GRAD_BUCKET = 1 << 25  # values per gradient all-reduce: the flat copy is at most 128 MiB of fp32 at any time


def sync_gradients(params, world, n, bucket_elements=GRAD_BUCKET):
    """Gradient of the step = (sum over ranks of this rank's summed micro-batch gradients) / n, with n the number of
    non-empty micro-batches of the whole step. One all-reduce per bucket of <= bucket_elements values (per dtype);
    a parameter without a gradient on this rank (no micro-batch here had readable audio) contributes zeros."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if world > 1:
        by_dtype = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            bucket, size = [], 0
            for g in group + [None]:
                if g is None or (bucket and size + g.numel() > bucket_elements):
                    flat = torch.cat([x.reshape(-1) for x in bucket])
                    dist.all_reduce(flat)
                    offset = 0
                    for x in bucket:
                        x.copy_(flat[offset:offset + x.numel()].view_as(x))
                        offset += x.numel()
                    bucket, size = [], 0
                if g is not None:
                    bucket.append(g)
                    size += g.numel()
    for g in grads:
        g.div_(n)


def broadcast_parameters(params, world):
    """Rank 0's trainable parameters on every rank (they are equal by construction; this makes sure)."""
    if world > 1:
        for p in params:
            dist.broadcast(p.data, 0)


def max_rank_divergence(params, world):
    """max |p - p_on_rank_0| over the trainable parameters and ranks (0.0 when the replicas are equal)."""
    if world == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def reduce_device(model):
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    return next(model.parameters()).device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


# ----------------------------------------------------------------------------- files: atomic writes, temporary files, metrics


def atomic(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:  # hypotheses and prompts hold CJK text
        f.write(text)


def save_weights(model, path):
    """model.save_trainable writes path and path.json; both atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_trainable(tmp)
    os.replace(tmp + ".json", path + ".json")
    os.replace(tmp, path)


def clean_temporaries(folder, names):
    """Remove what killed saves leave in `folder`: `<name>.tmp<pid>` (and its .json) for the given file names
    (atomic, save_weights), and safetensors' own hidden `.tmpXXXXXX` files (it writes beside the target and
    renames) when they hold a safetensors file or less than its header. Returns the removed names."""
    ours = re.compile(r"^(?:%s)(?:\.json)?\.tmp\d+(?:\.json)?$" % "|".join(re.escape(n) for n in names))
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not ours.match(name):
            if not re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name):
                continue
            with open(path, "rb") as f:
                head = f.read(9)
            if len(head) == 9 and head[8:9] != b"{":  # not a safetensors header (8-byte length, then JSON)
                continue
        os.remove(path)
        removed.append(name)
    return removed


OWN_FILES = (CHECKPOINT, LAST, BEST, METRICS, ARGS)


class Metrics:
    """metrics.jsonl writer (rank 0). On --resume, rows past the checkpoint's step (from the killed run) are dropped,
    and so is a last line cut short by a kill; a fresh run starts the file anew."""

    def __init__(self, folder, rank, resume_step=None):
        self.path, self.rank = os.path.join(folder, METRICS), rank
        if rank == 0 and os.path.exists(self.path):
            keep = []
            if resume_step is not None:
                with open(self.path) as f:
                    lines = [(n, l) for n, l in enumerate(f, 1) if l.strip()]
                for i, (n, line) in enumerate(lines):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        if i == len(lines) - 1:  # the half-written last row of a killed run
                            print(f"--resume: {self.path}: line {n} is cut short (a kill while writing): dropped")
                            continue
                        raise data.UserError(f"{self.path}: line {n}: invalid JSON ({e.msg}); fix or remove that "
                                             f"line to resume") from None
                    if row.get("step", 0) <= resume_step:
                        keep.append(json.dumps(row) + "\n")
            atomic(self.path, lambda p: write_text(p, "".join(keep)))

    def write(self, row):
        """Append one row; non-finite numbers become null (strict JSON)."""
        if self.rank == 0:
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- checkpoints and what a resume may change

# Flags that do not change what is trained (where and how often to write, how to run, what to do on errors).
RESUME_IGNORED = frozenset({"output_dir", "resume", "resume_changes", "save_every", "log_every", "num_workers",
                            "stop_after_steps", "gradient_checkpointing", "max_bad_steps", "skip_bad", "dist_timeout",
                            "grad_accum"})


# Flags a resumed run can never change: the data position, order and initialisation depend on them.
RESUME_FIXED = frozenset({"seed", "batch_size", "train", "epoch_size", "align", "init"})


def training_record(args, micro_batch):
    """The training-relevant settings of this run, as stored in checkpoint.pt (JSON values): every flag except
    RESUME_IGNORED, and the micro-batch size actually used."""
    rec = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RESUME_IGNORED}, default=str))
    rec["per_device_batch_size"] = micro_batch
    return rec


def record_changes(saved, new):
    """[(flag name, checkpoint value, new value)] for the settings both records have and that differ."""
    return [(k, saved[k], new[k]) for k in sorted(set(saved) & set(new)) if saved[k] != new[k]]


def check_fixed(ck, args, sizes, path):
    """Refuse a resume that changes what cannot change (RESUME_FIXED, the manifests' sizes)."""
    saved = ck.get("record") or dict(batch_size=ck["batch_size"], seed=ck["seed"])  # older checkpoints
    new = training_record(args, None)
    fixed = [c for c in record_changes(saved, new) if c[0] in RESUME_FIXED]
    if ck.get("sizes") is not None and list(ck["sizes"]) != list(sizes):
        fixed.append(("train", f"{ck['sizes']} entries", f"{list(sizes)} entries"))
    if fixed:
        raise data.UserError(f"--resume: {path} cannot continue with these settings (the data position, order or "
                             f"initialisation depend on them):\n" + "\n".join(
                                 f"  {flag(k)}: checkpoint {old!r}, this run {new!r}" for k, old, new in fixed))


def check_changes(ck, rec, args, path):
    """-> the changed settings [(flag, old, new)] that --resume-changes apply takes over; with the default
    (refuse) any change stops the run with the list."""
    if "record" not in ck:
        return []
    changes = [c for c in record_changes(ck["record"], rec) if c[0] not in RESUME_FIXED]
    if changes and args.resume_changes != "apply":
        raise data.UserError(
            f"--resume: this run's settings differ from those {path} was trained with:\n"
            + "\n".join(f"  {flag(k)}: checkpoint {old!r}, this run {new!r}" for k, old, new in changes)
            + "\nGive the checkpoint's values to continue that run unchanged, or --resume-changes apply to train with "
              "the new ones from here on (schedule and optimizer follow them; args.json and metrics.jsonl record from "
              "which step).")
    return changes


def rng_state():
    """This process's RNG states; for CUDA only the current device's (a resume may see another number of GPUs)."""
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]], python=random.getstate())


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state; take this device's if saved
        index = torch.cuda.current_device() if torch.cuda.is_available() else -1
        cuda = cuda[index] if 0 <= index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the current device
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, ...: say which file
        raise data.UserError(f"--resume: cannot read {path} ({type(e).__name__}: {str(e).strip()[:200]}); it is "
                             f"damaged or not a checkpoint of train.py (this code writes it atomically, so a kill does "
                             f"not do that: was it copied or edited?)") from None


def save_checkpoint(model, opt, sched, st, args, rank, world, meta):
    """checkpoint.pt (everything --resume needs; RNG states of every rank; the training record) and
    last.safetensors, atomically."""
    rng = all_gather_objects(rng_state(), world)
    if rank == 0:
        state = dict(model={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                     optimizer=opt.state_dict(), scheduler=sched.state_dict(), state=copy.deepcopy(st), rng=rng,
                     world_size=world, batch_size=args.batch_size, seed=args.seed, **meta)
        save_weights(model, os.path.join(args.output_dir, LAST))
        atomic(os.path.join(args.output_dir, CHECKPOINT), lambda p: torch.save(state, p))
    if world > 1:
        dist.barrier()


def load_checkpoint(ck, path, model, opt, sched, st, rank, world):
    from model import load_trainable_state  # the model stack is loaded by then
    load_trainable_state(model, ck["model"], f"--resume: {path}", "were the model flags changed?")
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    st.update(ck["state"])
    if ck["world_size"] == world:
        set_rng_state(ck["rng"][rank])
