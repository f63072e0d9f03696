"""Exact OT with POT's network simplex, run as a separate process.

POT is imported as `ot`, the same name as this project's ot.py; run as a script, this file's folder
(tests/) is first on sys.path and the repository root is not, so `import ot` is POT here.
Usage: python pot_reference.py problems.npz answers.npz, where problems.npz holds x_K (n, d) and y_K (m, d)
for K = 0..N-1; answers.npz gets W_K (the exact squared-Euclidean W with uniform masses) and P_K (the plan).
"""
import sys

import numpy as np
import ot

assert hasattr(ot, "emd2"), f"imported {ot.__file__}, not POT"
problems = np.load(sys.argv[1])
answers = {}
for k in range(len(problems.files) // 2):
    x, y = problems[f"x_{k}"], problems[f"y_{k}"]
    cost = ot.dist(x, y, metric="sqeuclidean")
    plan = ot.emd(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost, numItermax=10_000_000)
    answers[f"W_{k}"] = np.sum(plan * cost)
    answers[f"P_{k}"] = plan
np.savez(sys.argv[2], **answers)
