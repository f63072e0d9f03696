"""The README against the code, so the two cannot drift apart: its `ot.py` snippet runs as written, from a copy
of ot.py under the name it says, beside POT; every command of its bash blocks (and of docs/data.md's, where it
sends the reader for the data) names a script that exists, gives that script's required flags, and uses only
flags and choices that the script's `--help` lists; every link and anchor resolves, and the layout table names
every module. Nothing here loads a model: `--help` runs in this process, where torch and transformers are
imported once."""
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "docs/data.md", "docs/demo.md"]  # pages whose commands are checked
PENDING = {"docs/gpu.md", "docs/troubleshooting.md"}  # linked pages written on other branches: checked once present


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def code_blocks(text, lang):
    """The fenced blocks of a language, also those indented inside a list."""
    return [textwrap.dedent(b) for b in re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", text, re.S | re.M)]


def commands(page):
    """The commands of a page's bash blocks as token lists: continuation lines joined, comments dropped, and
    `$NAME` replaced by the tokens of an earlier `NAME="..."` assignment on a line of its own (the README's $M)."""
    out, names = [], {}
    for block in code_blocks(read(page), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
                name, value = tokens[0].split("=", 1)
                names["$" + name] = shlex.split(value)
            elif tokens:
                out.append([t for token in tokens for t in names.get(token, [token])])
    return out


def script_calls():
    """-> {(script, subcommand or None): [flag lists of each call]} for every call of a project script."""
    calls = {}
    for page in PAGES:
        for tokens in commands(page):
            while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # OMP_NUM_THREADS=1 python ...
                tokens = tokens[1:]
            at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
            if at is None or tokens[0] not in ("python", "torchrun"):
                continue
            script, rest = tokens[at], tokens[at + 1:]
            sub = rest[0] if script == "prepare_data.py" else None
            calls.setdefault((script, sub), []).append((page, rest[1:] if sub else rest))
    return calls


CALLS = script_calls()


def help_text(script, sub):
    """`python SCRIPT [SUB] --help`, run in this process (main(argv) parses first, so nothing else runs)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        module.main([*([sub] if sub else []), "--help"])
    assert stop.value.code in (0, None)
    return out.getvalue()


def options(help_out):
    """-> ({flag: choices or None} of every option the help lists, the flags its usage line requires)."""
    usage = help_out.split("\n\n")[0]
    listed = {}
    for m in re.finditer(r"(?<![\w-])(--[\w-]+)(?: \{([^}]*)\})?", help_out):  # the description names flags too
        if listed.get(m.group(1)) is None:
            listed[m.group(1)] = m.group(2).split(",") if m.group(2) else None
    while True:  # required = what is left of the usage once every [optional] group is removed
        stripped = re.sub(r"\[[^\[\]]*\]", "", usage)
        if stripped == usage:
            break
        usage = stripped
    return listed, set(re.findall(r"(?<![\w-])--[\w-]+", usage))


def test_the_pages_have_the_commands_of_the_reproduction():
    scripts = {script for script, _ in CALLS}
    assert {"pretrain.py", "select_layers.py", "joint_train.py", "evaluate.py", "prepare_data.py"} <= scripts
    evaluations = [flags for page, flags in CALLS[("evaluate.py", None)] if page == "README.md"]
    assert any("--baseline-hyps" in flags for flags in evaluations)  # the significance test is in the sequence
    torchrun = [t for page in PAGES for t in commands(page) if t[0] == "torchrun"]
    assert {t[t.index("--nproc_per_node") + 1] for t in torchrun} == {"8"}  # the 8-GPU form, stages 1, 3, evaluation
    assert {next(x for x in t if x.endswith(".py")) for t in torchrun} == {"pretrain.py", "joint_train.py", "evaluate.py"}


@pytest.mark.parametrize("script,sub", sorted(CALLS, key=str), ids=lambda x: str(x))
def test_every_flag_is_in_the_scripts_help(script, sub):
    assert os.path.isfile(os.path.join(ROOT, script)), script
    listed, required = options(help_text(script, sub))
    for page, flags in CALLS[(script, sub)]:
        given = [t for t in flags if t.startswith("--")]
        where = f"{page}: {script} {sub or ''} {' '.join(flags)}"
        assert required <= set(given), f"{where}: missing {sorted(required - set(given))}"
        for i, token in enumerate(flags):
            if not token.startswith("--"):
                continue
            assert token in listed, f"{where}: {token} is not in {script} --help"
            if listed[token]:  # every value up to the next flag is one of the choices
                end = next((k for k in range(i + 1, len(flags)) if flags[k].startswith("--")), len(flags))
                assert set(flags[i + 1:end]) <= set(listed[token]) and end > i + 1, f"{where}: {token}"


def test_the_checkpoint_downloads_parse():
    """`hf download` (huggingface_hub's command line) knows the options the README gives it."""
    hf = shutil.which("hf")
    if hf is None:
        pytest.skip("huggingface_hub's `hf` command is not installed")
    calls = [t for t in commands("README.md") if t[:2] == ["hf", "download"]]
    assert calls
    help_out = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    for tokens in calls:
        for flag in (t for t in tokens if t.startswith("--")):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", help_out), (tokens, flag)


def test_ot_snippet_runs_as_written(tmp_path):
    """The snippet, from ot.py copied as the README says, in a folder of its own: it runs on this CPU, `import ot` there
    is still POT (when installed), and the results are what its comments say: W per problem, averaged, with a gradient
    in speech's dtype; D the (8, 8) matrix whose diagonal is those same W. Tolerance: D's diagonal solves the same
    problems in another batch layout, equal to 1e-5 relative in float32 (docs/ot.md); 1e-4 here leaves margin."""
    snippet = next(b for b in code_blocks(read("README.md"), "python") if "sinkhorn_ot" in b)
    copy = next(t for t in commands("README.md") if t[:2] == ["cp", "ot.py"])
    shutil.copy(os.path.join(ROOT, "ot.py"), tmp_path / os.path.basename(copy[2]))
    check = snippet + (
        "\nimport json, importlib.util\n"
        "pot = importlib.util.find_spec('ot')\n"
        "print(json.dumps(dict(device=device, loss=loss.item(), grad_dtype=str(speech.grad.dtype),\n"
        "    grad_finite=bool(speech.grad.isfinite().all()), grad_norm=speech.grad.norm().item(),\n"
        "    D=D.tolist(), own=sinkhorn_ot.__file__, pot=pot.origin if pot else None)))\n")
    (tmp_path / "snippet.py").write_text(check, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not the repository's ot.py
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["own"] == str(tmp_path / "sinkhorn_ot.py")
    if r["pot"] is not None:  # POT installed: the copy and POT are both importable, neither shadows the other
        assert not r["pot"].startswith(str(tmp_path)) and os.path.basename(os.path.dirname(r["pot"])) == "ot"
    D = r["D"]
    assert len(D) == 8 and all(len(row) == 8 for row in D)
    assert all(v > 0 for row in D for v in row)  # random clouds: W > 0
    mean_diagonal = sum(D[i][i] for i in range(8)) / 8
    assert abs(mean_diagonal - r["loss"]) <= 1e-4 * r["loss"], (mean_diagonal, r["loss"])
    assert r["grad_dtype"] == "torch.float32" and r["grad_finite"] and r["grad_norm"] > 0


def slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "docs/demo.md"])
def test_links_and_anchors_resolve(page):
    text = read(page)
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"{page}: no heading for #{anchor}"
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path))
        if resolved in PENDING and not os.path.exists(os.path.join(ROOT, resolved)):
            continue
        assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: link to missing {target}"


def test_contents_lists_every_section():
    text = read("README.md")
    sections = [h for h in re.findall(r"^## (.+)$", text, re.M) if h != "Contents"]
    contents = re.search(r"^## Contents\n(.*?)^## ", text, re.S | re.M).group(1)
    assert re.findall(r"\(#([^)]+)\)", contents) == [slug(h) for h in sections]


def test_layout_names_every_module():
    text = read("README.md")
    layout = re.search(r"^## Repository layout\n(.*?)^## ", text, re.S | re.M).group(1)
    modules = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    modules += ["demo/" + f for f in os.listdir(os.path.join(ROOT, "demo")) if f.endswith(".py")]
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, f"README's layout table does not name {missing}"
