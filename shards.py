"""How evaluate.py spreads decoding over processes and survives a kill: the files each rank writes.

The manifest is cut into batches of --batch-size consecutive entries, the same for any number of processes, and
under torchrun every rank decodes a contiguous run of those batches (so hypotheses do not depend on the number of
processes). Each rank appends its hypotheses, batch by batch as they are decoded, to its own file
<output-dir>/partial/hyps.<mode>.rank<r>.jsonl (flushed; a line cut by a kill is ignored), and rank 0 merges the
files in manifest order once every entry is there. No collective waits for the slowest rank's decoding (ranks are
compared through the files, which must be on a filesystem all ranks see), so ranks that differ by more than
--dist-timeout still finish; every rank waits for the files, then all leave the process group together
(runtime.close_distributed). A killed or failed evaluation run again with the same settings decodes only the batches
that are missing (with other settings the partial files are discarded, as it says); the partial folder is removed
when metrics.json is written.
"""
import json
import os
import sys
import time

import torch.distributed as dist

import data
import runtime

PARTIAL = "partial"


def shard(n, rank, world):
    """Contiguous slice of range(n) for `rank`; slices differ in size by at most 1 and cover range(n) in rank order."""
    return list(range(rank * n // world, (rank + 1) * n // world))


def gather(local, world):
    """Each rank's list -> the concatenation of all of them in rank order (on every rank)."""
    return [x for part in runtime.all_gather_objects(list(local), world) for x in part]


def rank_batches(n, batch_size, rank, world):
    """This rank's contiguous run of the batches of a manifest of n entries (each a list of batch_size consecutive
    indices, the last one shorter; the same batches for any number of processes)."""
    batches = [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]
    return [batches[j] for j in shard(len(batches), rank, world)]


def partial_path(out_dir, mode, rank):
    return os.path.join(out_dir, PARTIAL, f"hyps.{mode}.rank{rank}.jsonl")


def read_partial(out_dir, mode):
    """{manifest index: record} from every rank's partial file of `mode` (any earlier number of processes too);
    lines that are not whole JSON records (the last line of a killed writer) are ignored, and a hypothesis wins
    over a "skipped" record of the same entry."""
    folder, done = os.path.join(out_dir, PARTIAL), {}
    prefix = f"hyps.{mode}.rank"
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not (name.startswith(prefix) and name.endswith(".jsonl")):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("index"), int):
                    if record["index"] not in done or "skipped" in done[record["index"]]:  # a hypothesis wins
                        done[record["index"]] = record
    return done


class PartialWriter:
    """Appends this rank's records, one batch per write, flushed and fsync'ed, to its partial file. A line cut
    short by an earlier kill is removed first, so the next record starts on a line of its own."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb") as f:
                content = f.read()
            if content and not content.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(content.rfind(b"\n") + 1)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records):
        with runtime.writing(self.f.name):  # a full disk: one line naming the file (a cut line is ignored on resume)
            self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def undecoded(batches, out_dir, mode, skip_bad):
    """The batches whose records are not all in the partial files yet (an earlier run was killed). Without skip_bad,
    an entry an earlier --skip-bad run skipped is decoded (or fails) again."""
    done = read_partial(out_dir, mode)
    if not skip_bad:
        done = {i: r for i, r in done.items() if "skipped" not in r}
    return [b for b in batches if not all(i in done for i in b)]


def prepare_partial(out_dir, config, rank, world):
    """Rank 0 keeps the partial results of an earlier run with the same decoding config, or discards them (saying
    so); then every rank starts (one barrier, before any model is loaded)."""
    folder = os.path.join(out_dir, PARTIAL)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        cfg_path = os.path.join(folder, "config.json")
        old = None
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    old = json.load(f)
            except json.JSONDecodeError:
                old = None
        if old != config:
            stale = [n for n in os.listdir(folder) if n.endswith(".jsonl")]
            if stale:
                print(f"{folder}: partial hypotheses of an evaluation with other settings: discarded "
                      f"({len(stale)} files)", file=sys.stderr, flush=True)
            for n in stale:
                os.remove(os.path.join(folder, n))
            runtime.atomic(cfg_path, lambda tmp: runtime.write_text(tmp, json.dumps(config)))
        else:
            n_done = {m: len(read_partial(out_dir, m)) for m in ("st", "mt")}
            if any(n_done.values()):
                done = ", ".join(f"{m} {k} entries already decoded" for m, k in n_done.items() if k)
                print(f"resuming the evaluation in {out_dir}: {done}", file=sys.stderr, flush=True)
    if world > 1:
        dist.barrier()


def wait_for_partial(out_dir, modes, n, skip_bad, wait=True, poll_seconds=2.0, say_every=300.0):
    """Wait, without any collective, until the partial files hold all n entries of every mode (without skip_bad, a
    hypothesis for each); -> {mode: records in manifest order}. Says on stderr what is still missing every
    `say_every` seconds. wait=False (one process: nobody else writes them): what is missing is an error at once."""
    t0 = last = time.time()
    while True:
        results = {m: {i: r for i, r in read_partial(out_dir, m).items() if skip_bad or "skipped" not in r}
                   for m in modes}
        missing = {m: n - len([i for i in r if 0 <= i < n]) for m, r in results.items()}
        if not any(missing.values()):
            return {m: [r[i] for i in range(n)] for m, r in results.items()}
        if not wait:
            still = ", ".join(f"{m} {k} of {n}" for m, k in missing.items() if k)
            raise data.UserError(f"{os.path.join(out_dir, PARTIAL)}: hypotheses missing after decoding ({still}): "
                                 f"the partial files were changed or removed by something else; run the evaluation "
                                 f"again")
        if time.time() - last > say_every:
            last = time.time()
            still = ", ".join(f"{m} {k}" for m, k in missing.items() if k)
            print(f"waiting for the other ranks' hypotheses ({time.time() - t0:.0f} s): still missing {still}",
                  file=sys.stderr, flush=True)
        time.sleep(poll_seconds)


def remove_partial(out_dir):
    """The partial hypotheses are merged into hyps.*.jsonl: remove them (rank 0, every rank has finished)."""
    folder = os.path.join(out_dir, PARTIAL)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
