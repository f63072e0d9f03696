"""Tables and figures over finished evaluations (evaluate.py writes the metrics.json files they read):

    --table METRICS...   summary_table: one row per system in the form of the paper's tables (BLEU and chrF per mode
                         and language, the alignment degree); runs with the same --name are seeds of one system
                         (mean ± sample sd, the number of seeds). The first system is the baseline: a p-value is shown
                         for each seed whose paired bootstrap was computed against the first system's run of the same
                         training seed (recognised by the SHA-256 of its hypotheses, recorded in metrics.json).
    --mrr LAYERS_JSON    mrr_table: select_layers.py's layers.json as the paper's Figure 4, with the chance level
    --tsne FILE.png      tsne_panels: Figure 5. Speech (layer 0 = projector output, at the --align-positions windows)
                         and text (layer 0 = token embeddings) states, each averaged over its length, for the same N
                         pairs; t-SNE to 2-D (scikit-learn) and a kernel-density contour per modality (scipy), saved
                         as PNG (matplotlib). With --tsne-base, two panels (the base model, then --ckpt) on the same
                         pairs, with the same t-SNE settings and the same axes.
    --fig6 FILE.png      figure6: ST BLEU against the alignment degree, one labelled point per system (mean ± sd over
                         its seeds)

scikit-learn, scipy and matplotlib are optional: only --tsne and --fig6 need them. Nothing here loads a model.
"""
import json
import math
import os
import sys

import numpy as np

from data import UserError

FIG_INCHES, FIG_DPI = (6.0, 5.0), 100  # --tsne: a 600 x 500 pixel PNG per panel
FIG6_INCHES = (7.5, 6.0)  # the legend sits below the axes

# ----------------------------------------------------------------------------- --table


def read_json_object(path, what):
    """A JSON file holding an object -> dict, or a UserError naming the file (bare NaN / Infinity read as None)."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f, parse_constant=lambda name: None)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not {what}: invalid JSON at line {e.lineno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not {what}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not {what}") from None
    if not isinstance(m, dict):
        raise UserError(f"{path}: not {what}: a JSON {type(m).__name__}, not an object")
    return m


def read_all_metrics(paths):
    """read_metrics of every --table file; the same file named twice (another path to it too) is refused: it would
    count as two seeds of its system."""
    seen = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"--table: {path} is the same file as {seen[real]}: each run counts once (two paths to "
                            f"one metrics.json would count as two seeds)")
        seen[real] = path
    return [read_metrics(path) for path in paths]


def read_metrics(path):
    """A metrics.json for --table / --fig6 -> dict; a UserError names the file and what is wrong with it (not
    JSON, not an object, a score that is not a number). A bare NaN or Infinity (not JSON, but Python's json.dump
    writes it unless told otherwise) reads as missing."""
    m = read_json_object(path, "a metrics file")
    def bad(where, what):
        raise UserError(f"{path}: {where} {what} (is this evaluate.py's metrics.json?)")
    if "mrr" in m and "selected" in m:
        raise UserError(f"{path}: select_layers.py's layers.json, not evaluate.py's metrics.json: print it with --mrr")
    def number(where, x):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            bad(where, f"must be a number, got {x!r}")
    if not isinstance(m.get("name", ""), str):
        bad('"name"', f"must be a string, got {m['name']!r}")
    if not isinstance(m.get("bleu", {}), dict):
        bad('"bleu"', "must be an object {mode: {language: scores}}")
    for mode, langs in m.get("bleu", {}).items():
        if not isinstance(langs, dict):
            bad(f'"bleu" -> {mode!r}', "must be an object {language: scores}")
        for lang, sc in langs.items():
            where = f'"bleu" -> {mode!r} -> {lang!r}'
            if not isinstance(sc, dict):
                bad(where, "must be an object with \"score\"")
            for key in ("score", "chrf"):
                number(f"{where} -> {key!r}", sc.get(key))
            bs = sc.get("paired_bs")
            if bs is not None:
                if not isinstance(bs, dict) or not isinstance(bs.get("bleu"), dict):
                    bad(f"{where} -> 'paired_bs'", "must be an object with \"bleu\": {\"p\": ...}")
                number(f"{where} -> 'paired_bs' -> 'bleu' -> 'p'", bs["bleu"].get("p"))
    a = m.get("alignment")
    if a is not None:
        if not isinstance(a, dict) or not isinstance(a.get("log_w", {}), dict) or \
                not isinstance(a.get("layers", []), list):
            bad('"alignment"', "must be an object with \"layers\", \"log_w\" and \"mean\"")
        for key in ("mean", "mismatched_mean"):
            number(f'"alignment" -> {key!r}', a.get(key))
        for l, v in a.get("log_w", {}).items():
            number(f'"alignment" -> "log_w" -> {l!r}', v)
    if not isinstance(m.get("train") or {}, dict):
        bad('"train"', "must be an object")
    if not m.get("bleu") and not m.get("alignment"):
        bad("has", 'neither "bleu" scores nor an "alignment": nothing to put in a table')
    return m


def group_runs(runs):
    """Runs that share a name are seeds of one system -> [(name, [runs])], systems in order of first appearance."""
    groups = {}
    for m in runs:
        groups.setdefault(m.get("name") or "?", []).append(m)
    return list(groups.items())


def seed_of(m):
    return (m.get("train") or {}).get("seed")


def mean_sd(xs, digits):
    """'mean' of one value, 'mean ± sd' of several (sd: sample standard deviation, n - 1), '-' of none; a value
    missing from some seeds is said: '(k of n)'."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    cell = f"{np.mean(vals):.{digits}f}" + (f" ± {np.std(vals, ddof=1):.{digits}f}" if len(vals) > 1 else "")
    return cell + (f" ({len(vals)} of {len(xs)})" if len(vals) < len(xs) else "")


def same_seed_pvalues(group, baseline_group, mode, lang, metric="bleu"):
    """The paired-bootstrap p-values of a system's seeds against the first system (the baseline): for each seed,
    the p of its metrics.json whose baseline hypotheses (sha256) are those of a baseline run with the same
    training seed (where the seeds are known). -> list of p, one per seed that has one; None for a seed whose
    hypotheses are the baseline's (no difference: SacreBLEU's p would be its floor)."""
    def scores(m):
        return m.get("bleu", {}).get(mode, {}).get(lang) or {}
    base = {scores(b).get("sha256"): seed_of(b) for b in baseline_group if scores(b).get("sha256")}
    ps = []
    for m in group:
        bs = scores(m).get("paired_bs") or {}
        if bs.get("baseline_sha256") not in base:
            continue
        seed, base_seed = seed_of(m), base[bs["baseline_sha256"]]
        if seed is not None and base_seed is not None and seed != base_seed:
            continue
        p = (bs.get(metric) or {}).get("p")
        if bs.get("identical") or scores(m).get("sha256") == bs["baseline_sha256"]:
            ps.append(None)
        elif p is not None:
            ps.append(p)
    return ps


def p_cell(ps, n):
    """p-values of the seeds of a system: each (up to 3 seeds) or their median with the count below 0.05;
    "same" (counted as p = 1) for a seed whose hypotheses are the baseline's."""
    if not ps:
        return "-"
    if len(ps) <= 3:
        cell = ", ".join("same" if p is None else f"{p:.3f}" for p in ps)
    else:
        ps1 = [1.0 if p is None else p for p in ps]
        cell = f"median {np.median(ps1):.3f}, {sum(p < 0.05 for p in ps1)}/{len(ps)} < 0.05"
    return cell + (f" ({len(ps)} of {n} seeds)" if len(ps) < n else "")


def summary_table(runs):
    """Metrics dicts (one per run) -> a Markdown table in the form of the paper's tables: one row per system (runs
    that share a name are its seeds: mean ± sd, and a "seeds" column when a system has several), BLEU and chrF
    per mode and target language (Tables 2-5), the paired-bootstrap p-value of BLEU against the first system's
    same-seed run where the runs have one ("p"), and the alignment degree (log W per layer, mean, and the
    mismatched-pair level; Figure 6)."""
    groups = group_runs(runs)
    cols = []  # (header, cell(group index, runs)), in order of first appearance
    def add(header, cell):
        if header not in [h for h, _ in cols]:
            cols.append((header, cell))
    def score(mode, lang, key):
        return lambda k, g: mean_sd([m.get("bleu", {}).get(mode, {}).get(lang, {}).get(key) for m in g], 1)
    def pvals(mode, lang):
        return lambda k, g: "" if k == 0 else p_cell(same_seed_pvalues(g, groups[0][1], mode, lang), len(g))
    for m in runs:
        for mode in ("st", "mt"):
            for lang, sc in m.get("bleu", {}).get(mode, {}).items():
                add(f"{mode.upper()} {lang}", score(mode, lang, "score"))
                if sc.get("chrf") is not None:
                    add(f"{mode.upper()} {lang} chrF", score(mode, lang, "chrf"))
                if any(same_seed_pvalues(g, groups[0][1], mode, lang) for _, g in groups[1:]):
                    add(f"{mode.upper()} {lang} p", pvals(mode, lang))
        if m.get("alignment"):
            for l in m["alignment"].get("layers", []):
                add(f"log W L{l}", lambda k, g, l=str(l):
                    mean_sd([(m.get("alignment") or {}).get("log_w", {}).get(l) for m in g], 3))
    if any(m.get("alignment") for m in runs):
        add("log W mean", lambda k, g: mean_sd([(m.get("alignment") or {}).get("mean") for m in g], 3))
        add("mismatched", lambda k, g: mean_sd([(m.get("alignment") or {}).get("mismatched_mean") for m in g], 3))
    seeds = any(len(g) > 1 for _, g in groups)
    header = ["Model"] + (["seeds"] if seeds else []) + [h for h, _ in cols]
    rows = [[name] + ([str(len(g))] if seeds else []) + [cell(k, g) for _, cell in cols]
            for k, (name, g) in enumerate(groups)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def fmt(x, digits):
    """A number with `digits` decimals, "-" for a missing one."""
    return "-" if x is None else f"{x:.{digits}f}"

# ----------------------------------------------------------------------------- --mrr (Figure 4)


def chance_mrr(n):
    """(mean, sd) of the MRR of n independent uniformly random rankings of n candidates: the level a layer without
    any speech-text alignment reaches (select_layers.py's docstring derives it):
        E[MRR] = H_n / n,   sd[MRR] = sqrt((H2_n / n - (H_n / n)^2) / n),   H_n = sum_{r<=n} 1/r, H2_n = sum 1/r^2"""
    h1 = sum(1.0 / r for r in range(1, n + 1))
    h2 = sum(1.0 / r ** 2 for r in range(1, n + 1))
    mean = h1 / n
    return mean, math.sqrt(max(h2 / n - mean ** 2, 0.0) / n)


def mrr_table(path):
    """--mrr: select_layers.py's layers.json -> the paper's Figure 4 as a table (MRR per layer, the selected
    layers, and the chance level of the retrieval: a random ranking of n candidates has MRR H_n / n)."""
    m = read_json_object(path, "select_layers.py's layers.json")
    try:
        mrr = {int(l): float(v) for l, v in m["mrr"].items()}
        selected, n = [int(l) for l in m["selected"]], int(m["num_pairs"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not select_layers.py's layers.json (needs \"mrr\", \"selected\", "
                        f"\"num_pairs\"; {type(e).__name__}: {e})") from None
    chance = chance_mrr(n)[0]
    lines = ["| Layer | MRR | selected |", "|---|---|---|"]
    lines += [f"| {l} | {v:.4f} | {'yes' if l in selected else ''} |" for l, v in sorted(mrr.items())]
    lines.append(f"\n{n} candidates: chance level MRR = H_n / n = {chance:.4f}; threshold "
                 f"{m.get('threshold', '?')}; selected layers: {' '.join(map(str, selected)) or 'none'}")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- figures (--tsne, --fig6)


def plot_libs():
    """The optional libraries of --tsne and --fig6, or an error saying what to install."""
    try:
        from matplotlib.figure import Figure
        from scipy.stats import gaussian_kde
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise UserError(f"--tsne and --fig6 need scikit-learn, scipy and matplotlib ({e}): "
                        f"pip install scikit-learn matplotlib") from None
    return Figure, gaussian_kde, TSNE


def tsne_figure(speech, text, path, seed=0, title=""):
    """The paper's Figure 5 for one model: speech (N, d) and text (N, d) vectors -> PNG (see tsne_panels).
    Returns the (2N, 2) embedding (speech rows first)."""
    return tsne_panels([(title, speech, text)], path, seed=seed)[0]


def tsne_panels(panels, path, seed=0):
    """The paper's Figure 5: one panel per model, [(title, speech (N, d), text (N, d))] -> one PNG, panels side by
    side. Per panel: t-SNE of its 2N points to 2-D (scikit-learn; the same settings for every panel: perplexity
    min(30, (2N - 1) / 3), PCA initialisation, random_state `seed`), a scatter and a Gaussian kernel-density contour
    (scipy) per modality, on the same axes scale in every panel (shared limits, the densities on one grid) so that
    distances compare across panels. FIG_INCHES per panel at FIG_DPI. Returns each panel's (2N, 2) embedding
    (speech rows first)."""
    Figure, gaussian_kde, TSNE = plot_libs()
    embedded = []
    for title, speech, text in panels:
        speech, text = np.asarray(speech, np.float64), np.asarray(text, np.float64)
        if len(speech) < 3:
            raise UserError(f"--tsne needs at least 3 pairs, got {len(speech)}")
        x = np.concatenate([speech, text])
        perplexity = min(30.0, (len(x) - 1) / 3)  # sklearn's default 30 must stay below the number of points
        embedded.append(TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x))
    every = np.concatenate(embedded)
    lo, hi = every.min(0), every.max(0)
    pad = 0.15 * (hi - lo + 1e-9)
    lo, hi = lo - pad, hi + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
    fig = Figure(figsize=(FIG_INCHES[0] * len(panels), FIG_INCHES[1]), dpi=FIG_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (title, speech, _), xy in zip(axes, panels, embedded):
        n = len(speech)
        for pts, name, color, cmap in ((xy[:n], "speech", "tab:blue", "Blues"), (xy[n:], "text", "tab:red", "Reds")):
            try:
                density = gaussian_kde(pts.T)(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
                # levels at fixed fractions of the peak: none near 0, where a contour would wander over the panel
                ax.contour(gx, gy, density, levels=density.max() * np.array([0.1, 0.25, 0.45, 0.65, 0.85]),
                           cmap=cmap, linewidths=1.0)
            except (np.linalg.LinAlgError, ValueError) as e:  # e.g. points on a line: no 2-D density
                print(f"--tsne: no density contour for {name} ({e})", file=sys.stderr, flush=True)
            ax.scatter(pts[:, 0], pts[:, 1], s=8, color=color, alpha=0.6, label=f"{name} ({n} utterances)")
        ax.set_title(title or "t-SNE", fontsize=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("t-SNE of length-averaged layer-0 states (speech: projector output; text: token embeddings)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=FIG_DPI)
    return embedded


def figure6(runs, paths, path, lang=None):
    """The paper's Figure 6: ST BLEU against the alignment degree (mean log W over the layers every run was measured
    at; lower = speech and text states closer), one labelled point per system: the run itself, or the mean over its
    seeds with ± sd bars on both axes and each seed as a small dot. -> PNG at `path`; returns the plotted
    [(name, x mean, y mean, n)]."""
    Figure = plot_libs()[0]
    layers, lang = figure6_axes(runs, paths, lang)
    fig = Figure(figsize=FIG6_INCHES, dpi=FIG_DPI)
    ax = fig.subplots()
    colors = [f"C{i}" for i in range(10)]
    out = []
    for k, (name, g) in enumerate(group_runs(runs)):
        xs = np.array([m["alignment"]["mean"] for m in g])
        ys = np.array([m["bleu"]["st"][lang]["score"] for m in g])
        c = colors[k % len(colors)]
        label = f"{name} ({len(g)} seeds)" if len(g) > 1 else name
        if len(g) > 1:
            ax.scatter(xs, ys, s=12, color=c, alpha=0.35, linewidths=0)
            ax.errorbar(xs.mean(), ys.mean(), xerr=xs.std(ddof=1), yerr=ys.std(ddof=1), fmt="o", color=c,
                        capsize=3, markersize=7, label=label)
        else:
            ax.plot(xs, ys, "o", color=c, markersize=7, label=label)
        out.append((name, float(xs.mean()), float(ys.mean()), len(g)))
    which = "layer " + ", ".join(map(str, layers)) if len(layers) == 1 else "layers " + ", ".join(map(str, layers))
    ax.set_xlabel(f"alignment degree: mean log W(speech, text) at {which}  (lower = closer)")
    ax.set_ylabel(f"ST BLEU ({lang})")
    ax.set_title("ST BLEU against the speech-text alignment degree (paper Figure 6)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    # the legend below the axes, so that no name next to a point can hide under it
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, title_fontsize=8,
              title="mean ± sd over seeds (small dots: each seed)" if any(n > 1 for *_, n in out) else None)
    fig.tight_layout()
    label_points(fig, ax, [(name, x, y) for name, x, y, _ in out], colors)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=FIG_DPI)
    return out


def figure6_axes(runs, paths, lang=None):
    """-> (the layers of the alignment degree, the target language of the ST BLEU) that every run has; else a
    UserError naming the run's file."""
    layers = None
    for m, p in zip(runs, paths):
        a = m.get("alignment") or {}
        if a.get("mean") is None:
            raise UserError(f"{p}: no alignment degree (evaluate.py --alignment LAYER ...); --fig6 plots it")
        if layers is None:
            layers, first = a.get("layers"), p
        elif a.get("layers") != layers:
            raise UserError(f"{p}: alignment measured at layers {a.get('layers')}, {first} at {layers}: "
                            f"--fig6 compares one degree (the same layers) across runs")
        st = m.get("bleu", {}).get("st", {})
        key = lang or next(iter(st), None)
        if st.get(key, {}).get("score") is None:
            raise UserError(f"{p}: no ST BLEU" + (f" for {key}" if key else "") + "; --fig6 plots ST BLEU")
        lang = key
    return layers, lang


def label_points(fig, ax, points, colors):
    """Each name next to its point [(name, x, y)], where it covers no other name and no point (a 16-pixel box around
    each) and is not cut by the edge of the plot; where no such place is free, at the first one (the legend still
    names the colour)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox
    renderer = FigureCanvasAgg(fig).get_renderer()
    placed = [Bbox.from_bounds(px - 8, py - 8, 16, 16) for px, py in ax.transData.transform([(x, y) for _, x, y
                                                                                              in points])]
    inside = ax.get_window_extent(renderer)
    for k, (name, x, y) in enumerate(points):
        for dx, dy, ha in ((8, 6, "left"), (8, -14, "left"), (-8, 6, "right"), (-8, -14, "right"), (8, 20, "left"),
                           (8, -28, "left"), (-8, 20, "right"), (-8, -28, "right")):
            label = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha,
                                color=colors[k % len(colors)])
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) and inside.x0 <= box.x0 and box.x1 <= inside.x1 \
                    and inside.y0 <= box.y0 and box.y1 <= inside.y1:
                break
            label.remove()
        else:
            label = ax.annotate(name, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8,
                                color=colors[k % len(colors)])
        placed.append(label.get_window_extent(renderer))
