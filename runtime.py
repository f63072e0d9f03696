"""What running a training or evaluation job needs besides the method: the command line's help and user errors,
the process group and the loop's collectives, atomic files and the temporary files a kill leaves, metrics rows,
and checkpoints with the record of what a resume may change. train.py and evaluate.py call these by name; none of
it is in the paper, so a reader of the method can skip this file.

Resume (--resume, RunFolder). checkpoint.pt stores the training-relevant flags (training_record). A resume whose
flags differ stops and lists each difference (flag, checkpoint value, new value); --resume-changes apply trains with
the new values from the resumed step on (the schedule and every optimizer group's lr, weight decay, betas and
eps), and args.json ("resume_history") and metrics.jsonl (an "event": "resume" row) say from which step which
values held. --seed, --batch-size, --train (and the manifests' sizes), --epoch-size, --align and --init can
never change. Another number of processes keeps the checkpoint's micro-batch size and adapts the accumulation
(exact up to float summation order), or stops where B / (b x W) is not a whole number.

Processes (process_group): a collective that waits more than --dist-timeout minutes (a dead or stuck rank) ends
the run with `<script>.py: error: rank R: ...` instead of hanging.

Output folder of train.py (--output-dir, RunFolder): args.json (+ the batch layout used and the resume history);
metrics.jsonl (one JSON object per --log-every steps: "step" = steps done, means over those steps of the objective's
values, "lr" of the last one, "grad_norm", "samples_per_s", "bad_steps", and the data counts summed over workers and
ranks "n_bad_audio" (unreadable clips skipped) and "n_truncated" (clips cut to Whisper's window); one per validation
with "split": "dev"; an "end" record with the run's totals: "counts", "bad_lines" (manifest lines skipped),
"empty_steps"); checkpoint.pt (full training state for --resume: trainable parameters, optimiser, scheduler, step,
data position, per-rank RNG states, early-stopping state, training record); last.safetensors (+ .json:
LSM.save_trainable, the next stage's --init); best.safetensors (with a dev set: best validation accuracy). Every
file is written under a temporary name and renamed (os.replace): a kill never leaves a half-written file, and the
temporary files a kill leaves are removed when a run starts and ends.
"""
import argparse
import contextlib
import copy
import datetime
import errno
import fcntl
import io
import json
import math
import os
import random
import re
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 (before any process group exists: see close_distributed)

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
        if isinstance(action.type, Range) and action.help is not argparse.SUPPRESS:
            action = copy.copy(action)
            text = action.help.replace("(default: %(default)s)", "").strip()
            action.help = f"{text} [{action.type.describe()}]".strip()
        super().add_argument(action)


def flag(name):
    return "--" + name.replace("_", "-")


class Range:
    """argparse type of a numeric flag: an int, or a finite float, within bounds (gt / ge / lt / le); anything else
    stops the parse with the allowed range (argparse names the flag: `error: argument --lr: expected a number > 0,
    got '0'`), before any model loads. --help shows the range."""

    def __init__(self, kind, *, gt=None, ge=None, lt=None, le=None):
        self.kind, self.gt, self.ge, self.lt, self.le = kind, gt, ge, lt, le

    def describe(self):
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        what = "an integer" if self.kind is int else "a number"
        if low and high:
            return f"{what} in {low}, {high}"
        bound = (f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None
                 else f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else "")
        return f"{what} {bound}".strip()

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not self.holds(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def holds(self, v):
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))


POSITIVE_INT, COUNT = Range(int, ge=1), Range(int, ge=0)  # >= 1 (sizes, periods), >= 0 (workers, seeds, steps)
POSITIVE, NON_NEGATIVE = Range(float, gt=0), Range(float, ge=0)


def device_flag(text):
    """argparse type of --device: cpu, cuda or cuda:N of a GPU this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    n = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and (n == 0 or (device.index or 0) >= n):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has " + (
            f"{n} CUDA device(s): cuda:0 .. cuda:{n - 1}" if n else "no CUDA device; use cpu"))
    return text


def distinct(parser, name, values):
    """Refuse a list flag that names a value twice (--layers 0 0 1 would count layer 0 twice)."""
    if values is not None and len(set(values)) != len(values):
        parser.error(f"argument {flag(name)}: a value is given twice: {' '.join(map(str, values))}")


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
    finite collective timeout (--dist-timeout): a dead or stuck rank ends the run with a message, not a hang. On a
    GPU the group is bound to this rank's device (device_id: NCCL connects at once, to the right GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # model.rank_device did so before the model was built; a no-op then
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
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
        close_distributed(world, rank, timeout_minutes)


def close_distributed(world, rank, timeout_minutes):
    """Leave the process group; called from a `finally`. Unless an exception is on its way out (then torchrun ends
    the other ranks), every rank first waits for the others (a barrier, at most --dist-timeout), so none tears the
    group down while another still uses it. destroy_process_group then joins the group's worker threads while the
    interpreter still runs: a worker left alive frees the tensors of the last collective whenever it gets the CPU,
    and one that does so after the interpreter began to exit aborts the rank ("terminate called without an active
    exception"). It joins them only if nothing else holds the group: torch.distributed.nn, imported by the model
    libraries, holds it in default arguments if first imported after init_process_group (this module imports it
    first)."""
    if world == 1 or not dist.is_initialized():
        return
    try:
        if sys.exc_info()[0] is None:
            dist.barrier()
    except RuntimeError as e:
        raise (collective_failure(e, rank, timeout_minutes) or e) from None
    finally:
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


class WriteError(data.UserError):
    """A file could not be written (read-only folder, disk full, ...): the message names the path and the reason."""


def os_reason(err, path):
    """The OS's reason for a failed write of `path` ("No space left on device (ENOSPC)"), or None if `err` is not
    about the file system. Reads err itself (OSError), the error number in safetensors' message ("os error 28"),
    and, for torch's bare "unexpected pos" errors, the state of the folder (full, not writable)."""
    number = err.errno if isinstance(err, OSError) else None
    found = re.search(r"os error (\d+)", str(err))
    if number is None and found:
        number = int(found.group(1))
    if number is None and not isinstance(err, (RuntimeError, OSError)):
        return None
    if number is None:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            stat = os.statvfs(folder)
        except OSError:
            return None
        number = (errno.ENOSPC if stat.f_bavail == 0 else errno.EROFS if stat.f_flag & os.ST_RDONLY
                  else errno.EACCES if not os.access(folder, os.W_OK) else None)
        if number is None:
            return None
    return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"


@contextlib.contextmanager
def writing(path, *temporaries):
    """with writing(path, tmp...): a write that fails for a file-system reason raises WriteError naming `path`
    and the reason (os_reason), after removing the temporary files; any other failure propagates unchanged."""
    try:
        yield
    except Exception as e:
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        reason = os_reason(e, path)
        if reason is None:
            raise
        raise WriteError(f"cannot write {path}: {reason}" + ("; nothing was replaced (the previous version, if any, "
                                                             "is intact)" if temporaries else "")) from None


def file_mode():
    """The mode a new file gets under this process's umask (0o666 & ~umask): files written by libraries that use
    a private mode (safetensors writes 0600) are set to it."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half of one. A
    failed write (disk full, read-only folder) raises WriteError naming `path`; the temporary file is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, tmp):
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:  # hypotheses and prompts hold CJK text
        f.write(text)


class _Recorder(io.RawIOBase):
    """A binary file that keeps the OSError of a failed write: torch.save reports only "unexpected pos"."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def writable(self):
        return True

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise


def torch_save(obj, path):
    """torch.save(obj, path); a failed write raises the OSError behind it."""
    with open(path, "wb") as f:
        recorder = _Recorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def save_weights(model, path):
    """model.save_trainable writes path and path.json; both atomically, with the umask's file mode."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, tmp, tmp + ".json"):
        model.save_trainable(tmp)
        for name in (tmp, tmp + ".json"):
            os.chmod(name, file_mode())
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
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


LOCK = ".lock"


class FolderBusy(data.UserError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def folder_lock(folder, flag_name="--output-dir"):
    """with folder_lock(folder): one run per output folder at a time. Rank 0 (of torchrun, or the only process)
    takes an exclusive flock on <folder>/.lock for the run's life and writes who holds it; a second run that finds
    it taken stops at once with FolderBusy naming the folder and the holder. The kernel drops the lock when the
    holder's process ends, however it ends (a kill too), so it never stays stuck; the file itself stays (removing
    it would let a third run lock a new file while a second holds the old one). The other ranks of one torchrun
    share rank 0's folder and take no lock. folder None: nothing to lock."""
    if folder is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = os.path.join(folder, LOCK)
    with writing(path):  # a read-only or full file system: one line, before anything else
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            raise FolderBusy(f"{flag_name} {folder} is in use by another run ({holder}); wait for it to end or give "
                             f"another {flag_name}") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}: "
                      f"{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- checkpoints and what a resume may change

# Flags that do not change what is trained (where and how often to write, how to run, what to do on errors).
RESUME_IGNORED = frozenset({"output_dir", "resume", "resume_changes", "save_every", "log_every", "num_workers",
                            "stop_after_steps", "gradient_checkpointing", "max_bad_steps", "max_weight_growth",
                            "skip_bad", "dist_timeout", "grad_accum"})


# Flags a resumed run can never change: the data position, order and initialisation depend on them.
RESUME_FIXED = frozenset({"seed", "batch_size", "train", "epoch_size", "align", "init"})


def training_record(args, micro_batch):
    """The training-relevant settings of this run, as stored in checkpoint.pt (JSON values): every flag except
    RESUME_IGNORED, and the micro-batch size actually used."""
    record = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RESUME_IGNORED}, default=str))
    record["per_device_batch_size"] = micro_batch
    return record


def record_changes(saved, new):
    """[(flag name, checkpoint value, new value)] for the settings both records have and that differ."""
    return [(k, saved[k], new[k]) for k in sorted(set(saved) & set(new)) if saved[k] != new[k]]


def check_fixed(checkpoint, args, sizes, path):
    """Refuse a resume that changes what cannot change (RESUME_FIXED, the manifests' sizes)."""
    fixed = [c for c in record_changes(checkpoint["record"], training_record(args, None)) if c[0] in RESUME_FIXED]
    if list(checkpoint["sizes"]) != list(sizes):
        fixed.append(("train", f"{checkpoint['sizes']} entries", f"{list(sizes)} entries"))
    if fixed:
        raise data.UserError(f"--resume: {path} cannot continue with these settings (the data position, order or "
                             f"initialisation depend on them):\n" + "\n".join(
                                 f"  {flag(k)}: checkpoint {old!r}, this run {new!r}" for k, old, new in fixed))


def check_changes(checkpoint, record, args, path):
    """-> the changed settings [(flag, old, new)] that --resume-changes apply takes over; with the default
    (refuse) any change stops the run with the list."""
    changes = [c for c in record_changes(checkpoint["record"], record) if c[0] not in RESUME_FIXED]
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
    """Restore rng_state(); a CUDA state is restored on the current device, and ignored on a machine without one."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as the state is copied in
    except Exception as e:  # truncated, not a checkpoint, ...: say which file
        raise data.UserError(f"--resume: cannot read {path} ({type(e).__name__}: {str(e).strip()[:200]}); it is "
                             f"damaged or not a checkpoint of train.py (this code writes it atomically, so a kill does "
                             f"not do that: was it copied or edited?)") from None


def save_checkpoint(model, opt, sched, progress, args, rank, world, meta):
    """checkpoint.pt (everything --resume needs; RNG states of every rank; the training record) and
    last.safetensors, atomically."""
    rng = all_gather_objects(rng_state(), world)
    if rank == 0:
        state = dict(model={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                     optimizer=opt.state_dict(), scheduler=sched.state_dict(), state=copy.deepcopy(progress), rng=rng,
                     world_size=world, batch_size=args.batch_size, seed=args.seed, **meta)
        save_weights(model, os.path.join(args.output_dir, LAST))
        atomic(os.path.join(args.output_dir, CHECKPOINT), lambda p: torch_save(state, p))
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


# ----------------------------------------------------------------------------- the batch layout, fresh and resumed


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


def resume_layout(args, world, checkpoint, path):
    """The batch layout of a resumed run: the checkpoint's micro-batch size b is kept (unless
    --per-device-batch-size says otherwise, a change of setting), the accumulation becomes B / (b x processes).
    With the same b every step consists of the same micro-batches with the same dropout seeds, whatever the
    number of processes: only the order of the float additions of the gradient sum changes. Where B / (b x
    processes) is not a whole number, stop with what would work."""
    saved_b, saved_k, saved_world = checkpoint["micro_batch"], checkpoint["grad_accum"], checkpoint["world_size"]
    b = args.per_device_batch_size if args.per_device_batch_size is not None else saved_b
    B = args.batch_size
    if B % (b * world) == 0 and (args.grad_accum is None or args.grad_accum * b * world == B):
        return b, B // (b * world)
    if args.grad_accum is not None and B % (b * world) == 0:
        given = argparse.Namespace(batch_size=B, per_device_batch_size=b, grad_accum=args.grad_accum)
        return batch_layout(given, world)
    fits = [w for w in range(1, B // b + 1) if (B // b) % w == 0] if B % b == 0 else []
    raise data.UserError(
        f"--resume: {path} was trained with micro-batches of {saved_b} per device (global batch {B} = "
        f"{saved_b} x {saved_k} accumulation x {saved_world} processes); with "
        f"{world} processes and micro-batches of {b}, {B} / ({b} x {world}) is not a whole number of accumulation "
        f"steps. Resume with {' or '.join(map(str, fits))} processes (the same steps), or choose another micro-batch "
        f"with --per-device-batch-size N --resume-changes apply (the steps then average other groups of items)")


# ----------------------------------------------------------------------------- the run folder: start, resume, save


class RunFolder:
    """A training run's --output-dir, and what a resume needs from it. Opening it refuses to overwrite a run
    without --resume and removes what killed saves left; with --resume it reads checkpoint.pt and checks this run's
    flags against it (check_fixed, resume_layout, check_changes). It then holds the batch layout (micro_batch b,
    grad_accum k: --batch-size = b x k x processes), the training record and the history of applied changes, which
    every checkpoint stores, and the step of the last checkpoint (saved_at)."""

    def __init__(self, args, sizes, rank, world, print0):
        self.args, self.sizes, self.rank, self.world, self.print0 = args, list(sizes), rank, world, print0
        self.path = os.path.join(args.output_dir, CHECKPOINT)
        os.makedirs(args.output_dir, exist_ok=True)
        if os.path.exists(self.path) and not args.resume:
            raise FileExistsError(f"{self.path} exists: pass --resume to continue that run, or another --output-dir")
        if rank == 0:
            removed = clean_temporaries(args.output_dir, OWN_FILES)
            if removed:
                print0(f"removed {len(removed)} temporary file(s) left by a killed save in {args.output_dir}: "
                       f"{', '.join(removed)}")
        self.checkpoint = read_checkpoint(self.path) if args.resume and os.path.exists(self.path) else None
        self.resumed, self.saved_at, self.changes, self.history = self.checkpoint is not None, None, [], []
        self.resume_event = None
        if self.checkpoint is None:
            self.micro_batch, self.grad_accum = batch_layout(args, world)
            self.record = training_record(args, self.micro_batch)
            return
        check_fixed(self.checkpoint, args, sizes, self.path)
        self.micro_batch, self.grad_accum = resume_layout(args, world, self.checkpoint, self.path)
        self.record = training_record(args, self.micro_batch)
        self.changes = check_changes(self.checkpoint, self.record, args, self.path)
        self.history = list(self.checkpoint["history"])

    def resume(self, model, opt, sched, progress):
        """Load checkpoint.pt into the model, optimizer, schedule and progress (nothing without --resume or a
        checkpoint). -> True when the flags changed settings that the optimizer and schedule must now follow
        (--resume-changes apply: the caller runs train.apply_settings)."""
        checkpoint, b, k, world = self.checkpoint, self.micro_batch, self.grad_accum, self.world
        if checkpoint is None:
            if self.args.resume:
                self.print0(f"--resume: no {self.path} yet, starting from scratch")
            return False
        load_checkpoint(checkpoint, self.path, model, opt, sched, progress, self.rank, world)
        self.checkpoint, self.saved_at, step = None, progress["step"], progress["step"]  # its weights are loaded
        self.print0(f"resumed {self.path} at step {step} (epoch {progress['epoch']}, step {progress['step_in_epoch']} "
                    f"of it)")
        if self.changes:
            self.history.append(dict(step=step, changes={name: dict(old=o, new=n) for name, o, n in self.changes}))
            self.print0(f"--resume-changes apply: from step {step} on " + ", ".join(
                f"{flag(name)} {n!r} (was {o!r})" for name, o, n in self.changes))
        moved = (checkpoint["world_size"], checkpoint["grad_accum"]) != (world, k)
        if moved:
            self.print0(f"--resume: {checkpoint['world_size']} -> {world} process(es): micro-batches of {b} per device "
                        f"kept, accumulation {checkpoint['grad_accum']} -> {k}; every step has the same micro-batches "
                        f"and dropout masks (reseeded per micro-batch), only the order of the float additions of the "
                        f"gradient changes")
        if self.changes or moved:  # the first new row of metrics.jsonl (open_records)
            self.resume_event = dict(event="resume", step=step,
                                     changes=self.history[-1]["changes"] if self.changes else {})
            if moved:
                self.resume_event.update(world_size=[checkpoint["world_size"], world],
                                         grad_accum=[checkpoint["grad_accum"], k], per_device_batch_size=b)
        return bool(self.changes)

    def open_records(self, progress):
        """Write args.json (the flags, the batch layout, the resume history) and open metrics.jsonl (-> Metrics),
        whose first new row records a resume that changed settings or the number of processes."""
        if self.rank == 0:
            record = dict(vars(self.args), layout=dict(per_device_batch_size=self.micro_batch,
                                                       grad_accum=self.grad_accum, world_size=self.world),
                          resume_history=self.history)
            atomic(os.path.join(self.args.output_dir, ARGS),
                   lambda p: write_text(p, json.dumps(record, indent=1, default=str)))
        metrics = Metrics(self.args.output_dir, self.rank, progress["step"] if self.resumed else None)
        if self.resume_event is not None:
            metrics.write(self.resume_event)
        return metrics

    def save(self, model, opt, sched, progress):
        """checkpoint.pt and last.safetensors (save_checkpoint), with the layout and the record."""
        meta = dict(record=self.record, history=self.history, sizes=self.sizes, micro_batch=self.micro_batch,
                    grad_accum=self.grad_accum)
        save_checkpoint(model, opt, sched, progress, self.args, self.rank, self.world, meta)
        self.saved_at = progress["step"]

    def save_best(self, model):
        if self.rank == 0:
            save_weights(model, os.path.join(self.args.output_dir, BEST))

    def close(self):
        """Remove the temporary files a killed save left (rank 0)."""
        if self.rank == 0:
            clean_temporaries(self.args.output_dir, OWN_FILES)
