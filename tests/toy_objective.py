"""A toy objective for train.py (least squares through a frozen layer and a LayerNorm): imported by
tests/test_train.py, and run as a script under torchrun for the multi-process tests (fast: no model to load):

    torchrun --nproc_per_node 2 tests/toy_objective.py --output-dir D [train.py flags] [--stall-rank R ...]

--stall-rank R --stall-at-step S --stall-seconds T: rank R sleeps T seconds before its forward at step S (a stuck
rank, for --dist-timeout)."""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
import train  # noqa: E402


class Toy(nn.Module):
    """Least squares through a frozen layer and a LayerNorm. nan_calls: forward calls whose loss is NaN;
    accs: accuracies returned by successive evaluate() calls. Records the weights each forward sees."""

    def __init__(self, nan_calls=(), accs=()):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 1)
        self.nan_calls, self.accs, self.calls, self.evals, self.seen = set(nan_calls), list(accs), 0, 0, []
        self.skips = 0  # skip_batch() calls: micro-batches skipped for having no readable item

    def forward(self, batch):
        self.seen.append(self.lin.weight.detach().clone())
        loss = ((self.lin(self.norm(self.frozen(batch["x"]))).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        self.calls += 1
        return dict(loss=loss, mse=loss.detach())

    def skip_batch(self):
        self.skips += 1

    def evaluate(self, batch):
        acc = self.accs[self.evals]
        self.evals += 1
        return dict(loss=torch.tensor(1.0 - acc), n_correct=torch.tensor(acc * 1000), n_tokens=torch.tensor(1000))

    def save_trainable(self, path):
        save_file({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}, path)
        with open(path + ".json", "w") as f:
            json.dump({}, f)


def toy_data(n=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return [dict(x=x[i], y=x[i].sum()) for i in range(n)]


def collate(items):
    return dict(x=torch.stack([i["x"] for i in items]), y=torch.stack([i["y"] for i in items]))


def bad_items(items, bad):
    """items with those in `bad` unreadable, and a collate that drops them as data.Collator does (an empty batch
    is {"ids": [], "counts": ...})."""
    items = [dict(item, bad=i in bad) for i, item in enumerate(items)]

    def skip_bad(batch):
        good = [x for x in batch if not x["bad"]]
        counts = {"bad_audio": len(batch) - len(good), "truncated": 0}
        return dict(collate(good), ids=[0] * len(good), counts=counts) if good else dict(ids=[], counts=counts)
    return items, skip_bad


def main(argv=None):
    p = train.add_train_args(argparse.ArgumentParser(), warmup_steps=2, max_steps=6, validation=True)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--bad", type=int, nargs="*", default=[], help="unreadable items (dropped as data.Collator does)")
    p.add_argument("--stall-rank", type=int, default=-1)
    p.add_argument("--stall-at-step", type=int, default=1)
    p.add_argument("--stall-seconds", type=float, default=0.0)
    args = p.parse_args(argv)
    toy = Toy()
    if args.stall_rank >= 0 and int(os.environ.get("RANK", "0")) == args.stall_rank:
        forward, calls = toy.forward, []

        def stalled(batch):
            calls.append(1)
            if len(calls) == args.stall_at_step + 1:
                time.sleep(args.stall_seconds)
            return forward(batch)
        toy.forward = stalled
    items, collate_fn = toy_data(args.items), collate
    if args.bad:
        items, collate_fn = bad_items(items, set(args.bad))
    return train.train(args, toy, items, collate_fn)


if __name__ == "__main__":
    runtime.cli(main)
