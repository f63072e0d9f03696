"""evaluate.py: BLEU against the sacrebleu command line (zh, ja), decoding on tiny checkpoints (both templates,
greedy and beam, 1 vs 2 processes), zero-shot MT without audio, alignment degree, Figure 5, --audio, --hyps, --table.
"""
import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import soundfile as sf
import torch

import data
import evaluate as E
import model as M
import ot
import results
import runtime
import shards
from conftest import TINY_QFORMER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSCRIPTS = ["hello world", "the quick brown fox jumps", "one two three four", "she sells sea shells",
               "a man is speaking"]
TRANSLATIONS = ["你好世界", "敏捷的棕色狐狸跳跃", "一二三四", "她卖海贝壳", "一个男人在说话"]
SECONDS = [1.5, 2.0, 1.0, 2.5, 1.2]
FAST = ["--max-new-tokens", "6", "--batch-size", "2", "--num-workers", "0"]

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far too small for intra-op threads; on a few shared cores the threads' spin-waits made
    every op ~1000x slower (torch and scikit-learn's OpenMP alike). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except ImportError:
        limits = contextlib.nullcontext()
    with limits:
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """5 noise clips (different lengths) with transcripts and Chinese translations; CoVoST's 'zh-CN' code."""
    folder = tmp_path_factory.mktemp("covost_like")
    rng = np.random.default_rng(0)
    lines = []
    for i, (src, tgt, sec) in enumerate(zip(TRANSCRIPTS, TRANSLATIONS, SECONDS)):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
        lines.append(json.dumps(dict(id=f"u{i}", audio=f"u{i}.wav", task="st", text=src, translation=tgt,
                                     tgt_lang="zh-CN"), ensure_ascii=False))
    path = folder / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _perturb(lsm, scale=0.05, seed=1):
    """Move the trainable parameters off their init (LoRA B starts at zero), as a trained model would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lsm.trainable_state().values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module")
def trained(tiny_ckpts, tmp_path_factory):
    """{family: (ckpt path, the model that was saved)}: tiny LSMs saved with save_trainable (float32 LLM)."""
    import model as M
    out = {}
    for family in ("qwen2", "llama"):
        p = tiny_ckpts[family]
        torch.manual_seed(0)
        lsm = M.LSM(p["whisper"], p["llm"], p["beats"], llm_dtype="float32", verbose=False, **TINY_QFORMER).eval()
        _perturb(lsm)
        path = str(tmp_path_factory.mktemp(f"ckpt_{family}") / "best.safetensors")
        lsm.save_trainable(path)
        out[family] = (path, lsm)
    # another "training run" of the qwen2 model (other trained weights): a baseline for the paired tests, Figure 5
    lsm = M.LSM(p["whisper"], tiny_ckpts["qwen2"]["llm"], p["beats"], llm_dtype="float32", verbose=False,
                **TINY_QFORMER).eval()
    _perturb(lsm, seed=2)
    path = str(tmp_path_factory.mktemp("ckpt_qwen2_b") / "best.safetensors")
    lsm.save_trainable(path)
    out["qwen2_b"] = (path, lsm)
    # far from its init: ST hypotheses that differ between clips (the small perturbations give one constant string)
    p = tiny_ckpts["llama"]
    torch.manual_seed(0)
    lsm = M.LSM(p["whisper"], p["llm"], p["beats"], llm_dtype="float32", verbose=False, **TINY_QFORMER).eval()
    _perturb(lsm, scale=1.0)
    path = str(tmp_path_factory.mktemp("ckpt_llama_loud") / "best.safetensors")
    lsm.save_trainable(path)
    out["llama_loud"] = (path, lsm)
    return out


def speech_batch(lsm, manifest, indices):
    """The data.py batch of these manifest entries, as evaluate.py builds it."""
    from transformers import WhisperFeatureExtractor
    entries = data.read_manifest(manifest)
    ds = data.SpeechDataset(entries)
    return data.Collator(WhisperFeatureExtractor.from_pretrained(lsm.build_args["whisper"]))([ds[i] for i in indices])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]

# ----------------------------------------------------------------------------- BLEU


ZH_REFS = ["所有这些活动在密尔沃基都不是独一无二的。", "那里的许多吉祥物似乎也相信它们就是人们所描绘的那些动物。",
           "今天天气很好。", "我们明天去北京。", "他没有来。"]
ZH_HYPS = ["密尔沃基的所有活动都不是独一无二的。", "那里的许多吉祥物也似乎认为它们是描绘的动物。",
           "今天天气不错。", "我们明天要去北京。", ""]
JA_REFS = ["今日はとても良い天気です。", "私は明日東京に行きます。", "この本はとても面白いです。", "駅はどこですか。"]
JA_HYPS = ["今日は良い天気です。", "明日私は東京へ行きます。", "この本は面白いです。", "駅はどこにありますか。"]


def _sacrebleu_cli(*args):
    """The `sacrebleu` command of this Python (its console script runs the same main() as `-m sacrebleu`)."""
    cmd = [sys.executable, "-m", "sacrebleu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("lang,refs,hyps,tok", [("zh-CN", ZH_REFS, ZH_HYPS, "zh"),
                                                ("ja", JA_REFS, JA_HYPS, "ja-mecab")])
def test_bleu_equals_sacrebleu_command_line(tmp_path, capsys, lang, refs, hyps, tok):
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    hyps_file = tmp_path / "hyps.jsonl"
    hyps_file.write_text("".join(json.dumps(dict(id=str(i), reference=r, hypothesis=h, tgt_lang=lang),
                                            ensure_ascii=False) + "\n" for i, (r, h) in enumerate(zip(refs, hyps))),
                         encoding="utf-8")
    E.main(["--hyps", str(hyps_file)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"bleu", "chrf", "signature", "chrf_signature"} and f"tok:{tok}" in last["signature"]
    assert last["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert 10 < last["bleu"] < 90 and 10 < last["chrf"] < 90  # real scores, not a degenerate 0 or 100
    ref, hyp = str(tmp_path / "ref.txt"), str(tmp_path / "hyp.txt")
    assert _sacrebleu_cli(ref, "-i", hyp, "-tok", tok, "-b") == f"{last['bleu']:.1f}"
    # -w 6: the command line rounds to 6 decimals, so the scores agree to 5e-7
    assert float(_sacrebleu_cli(ref, "-i", hyp, "-tok", tok, "-b", "-w", "6")) == pytest.approx(last["bleu"], abs=5e-7)
    assert float(_sacrebleu_cli(ref, "-i", hyp, "-m", "chrf", "-b", "-w", "6")) == pytest.approx(last["chrf"], abs=5e-7)
    # the same file with the language only on the command line
    hyps_file.write_text("".join(json.dumps(dict(reference=r, hypothesis=h), ensure_ascii=False) + "\n"
                                 for r, h in zip(refs, hyps)), encoding="utf-8")
    E.main(["--hyps", str(hyps_file), "--tgt-lang", lang])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == last


def _noisy(refs, rng, p):
    """Each reference with each character dropped with probability p, or doubled with probability p / 2."""
    out = []
    for r in refs:
        chars = []
        for c in r:
            u = rng.random()
            chars += [] if u < p else [c, c] if u < 1.5 * p else [c]
        out.append("".join(chars))
    return out


def _write_hyps(path, refs, hyps, lang, ids=None):
    path.write_text("".join(json.dumps(dict(id=ids[i] if ids else f"s{i}", reference=r, hypothesis=h, tgt_lang=lang),
                                       ensure_ascii=False) + "\n" for i, (r, h) in enumerate(zip(refs, hyps))),
                    encoding="utf-8")


PAIRED_ROW = re.compile(r"(\d+\.\d+) \((\d+\.\d+) ± (\d+\.\d+)\)")


@pytest.mark.parametrize("lang,tok,p_base,p_sys", [("zh", "zh", 0.10, 0.10), ("zh", "zh", 0.3, 0.05),
                                                  ("ja", "ja-mecab", 0.10, 0.10)])
def test_paired_bootstrap_equals_sacrebleu_command_line(tmp_path, capsys, lang, tok, p_base, p_sys):
    """--hyps SYS --baseline BASE gives what `sacrebleu REF -i BASE SYS --paired-bs -m bleu chrf -tok TOK` prints,
    on systems close together (p well inside (0, 1)) and far apart (p at its floor 1/1001)."""
    import random
    rng = random.Random(f"{lang}{p_base}")
    refs = [rng.choice(ZH_REFS if lang == "zh" else JA_REFS) for _ in range(40)]
    base, hyps = _noisy(refs, rng, p_base), _noisy(refs, rng, p_sys)
    for name, lines in (("ref", refs), ("base", base), ("sys", hyps)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_hyps(tmp_path / "base.jsonl", refs, base, lang)
    _write_hyps(tmp_path / "sys.jsonl", refs, hyps, lang)
    E.main(["--hyps", str(tmp_path / "sys.jsonl"), "--baseline", str(tmp_path / "base.jsonl")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"bleu", "chrf", "signature", "chrf_signature", "paired_bs"}
    assert set(out["paired_bs"]) == {"bleu", "chrf"} and all(set(v) == {"mean", "ci", "p"}
                                                             for v in out["paired_bs"].values())
    text = _sacrebleu_cli(str(tmp_path / "ref.txt"), "-i", str(tmp_path / "base.txt"), str(tmp_path / "sys.txt"),
                          "--paired-bs", "-m", "bleu", "chrf", "-tok", tok, "-f", "text", "-w", "4")
    rows = PAIRED_ROW.findall(text)  # baseline BLEU, baseline chrF, system BLEU, system chrF
    pvalues = [float(p) for p in re.findall(r"p = (\d\.\d+)", text)]
    assert len(rows) == 4 and len(pvalues) == 2, text
    # the command line prints 4 decimals: agreement to 5e-5
    for key, (score, mean, ci), p in zip(("bleu", "chrf"), rows[2:], pvalues):
        assert float(score) == pytest.approx(out[key], abs=5e-5)
        assert float(mean) == pytest.approx(out["paired_bs"][key]["mean"], abs=5e-5)
        assert float(ci) == pytest.approx(out["paired_bs"][key]["ci"], abs=5e-5)
        assert p == pytest.approx(out["paired_bs"][key]["p"], abs=5e-5)
    if p_base == 0.3:
        assert out["paired_bs"]["bleu"]["p"] == pytest.approx(1 / 1001)  # (0 + 1) / (1000 + 1): far apart
        # identical systems: SacreBLEU's p is its floor too (no resampled difference exceeds 0); recorded as such
        E.main(["--hyps", str(tmp_path / "sys.jsonl"), "--baseline", str(tmp_path / "sys.jsonl")])
        printed = capsys.readouterr().out
        assert json.loads(printed.strip().splitlines()[-1])["paired_bs"]["bleu"]["p"] == pytest.approx(1 / 1001)
        assert "the same hypotheses (SacreBLEU's p is then 1/1001; there is no difference)" in printed
        (tmp_path / "sys2.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")  # it wants two file names
        same = _sacrebleu_cli(str(tmp_path / "ref.txt"), "-i", str(tmp_path / "sys.txt"), str(tmp_path / "sys2.txt"),
                              "--paired-bs", "-m", "bleu", "-tok", tok, "-f", "text", "-w", "4")
        assert "p = 0.0010" in same
    else:
        assert 0.01 < out["paired_bs"]["bleu"]["p"] < 0.99, out  # close together: a p that means something
    assert "bs:1000|seed:12345" in text and f"tok:{tok}" in out["signature"]


def test_paired_test_needs_the_same_references_in_the_same_order(tmp_path):
    refs = ["今天天气很好。", "我们明天去北京。", "他没有来。", "一二三四"]
    _write_hyps(tmp_path / "sys.jsonl", refs, refs, "zh")
    cases = [  # (baseline references, ids, the message)
        ([refs[0], refs[2], refs[1], refs[3]], None, r"sys.jsonl: line 2 and \S*base.jsonl: line 2 have different "
                                                     r"references \('我们明天去北京。' vs '他没有来。'\)"),
        (refs[:3], None, r"sys.jsonl has 4 segments but \S*base.jsonl has 3 \(the first 3 agree\)"),
        (refs, ["s0", "s1", "x2", "s3"], r"sys.jsonl: line 3 has id 's2' but \S*base.jsonl: line 3 has id 'x2'")]
    for base_refs, ids, message in cases:
        _write_hyps(tmp_path / "base.jsonl", base_refs, base_refs, "zh", ids)
        with pytest.raises(data.UserError, match=message):
            E.main(["--hyps", str(tmp_path / "sys.jsonl"), "--baseline", str(tmp_path / "base.jsonl")])
    _write_hyps(tmp_path / "base.jsonl", refs, refs, "ja")
    with pytest.raises(data.UserError, match="target language 'zh' but .* has 'ja'"):
        E.main(["--hyps", str(tmp_path / "sys.jsonl"), "--baseline", str(tmp_path / "base.jsonl")])
    with pytest.raises(SystemExit):  # argparse: --baseline belongs to --hyps
        E.main(["--table", str(tmp_path / "m.json"), "--baseline", str(tmp_path / "base.jsonl")])


def test_tokenizer_by_language():
    assert [E.bleu_tokenizer(x) for x in ("zh", "zh-CN", "ZH_cn", "ja", "de", "en")] == \
        ["zh", "zh", "zh", "ja-mecab", "13a", "13a"]
    assert E.bleu_tokenizer("zh", "char") == "char"


def test_japanese_without_mecab_says_what_to_install(tmp_path, monkeypatch):
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(dict(reference="駅はどこですか。", hypothesis="駅はどこ", tgt_lang="ja")) + "\n")
    monkeypatch.setitem(sys.modules, "MeCab", None)  # import MeCab -> ImportError
    with pytest.raises(data.UserError, match=r'pip install "sacrebleu\[ja\]"'):
        E.main(["--hyps", str(f)])
    E.main(["--hyps", str(f), "--tokenize", "char"])  # an explicit tokenizer needs no MeCab


def test_bad_hypotheses_files_are_named(tmp_path):
    f = tmp_path / "h.jsonl"
    good = json.dumps(dict(reference="a b", hypothesis="a b", tgt_lang="de"))
    for body, message in [(good + "\n{oops\n", "h.jsonl: line 2: invalid JSON"),
                          (good + "\n" + json.dumps(dict(reference="a")) + "\n", "line 2: 'hypothesis' must be"),
                          (json.dumps(dict(reference="a", hypothesis="a")) + "\n", "line 1: no 'tgt_lang'"),
                          (good + "\n" + json.dumps(dict(reference="a", hypothesis="a", tgt_lang="ja")) + "\n",
                           "line 2: tgt_lang 'ja' differs from 'de' on line 1"),
                          ("\n", "no hypotheses")]:
        f.write_text(body)
        with pytest.raises(data.UserError, match=message):
            E.read_hyps(str(f))

# ----------------------------------------------------------------------------- decoding


def test_shards_cover_the_manifest_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 8):
            parts = [shards.shard(n, r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("family,beams", [("qwen2", 1), ("qwen2", 2), ("llama", 1), ("llama", 2)])
def test_decode_manifest(trained, manifest, tmp_path, family, beams):
    """Hypotheses equal the model's own generate() on the same batches; files and BLEU are consistent."""
    ckpt, lsm = trained[family]
    out = tmp_path / "eval"
    metrics = E.main(["--ckpt", ckpt, "--manifest", manifest, "--num-beams", str(beams), "--output-dir", str(out),
                      "--limit", "3", "--max-new-tokens", "6", "--batch-size", "2", "--num-workers", "0"])
    hyps = read_jsonl(out / "hyps.st.jsonl")
    assert [h["id"] for h in hyps] == ["u0", "u1", "u2"]
    assert [h["src"] for h in hyps] == TRANSCRIPTS[:3] and [h["reference"] for h in hyps] == TRANSLATIONS[:3]
    assert {h["tgt_lang"] for h in hyps} == {"zh"}
    expected = []
    for batch in ([0, 1], [2]):
        expected += lsm.generate(speech_batch(lsm, manifest, batch), mode="st", num_beams=beams, max_new_tokens=6)
    assert [h["hypothesis"] for h in hyps] == expected
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    bleu = sacrebleu.corpus_bleu(expected, [TRANSLATIONS[:3]], tokenize="zh")
    assert saved["bleu"]["st"]["zh"]["score"] == pytest.approx(bleu.score)
    assert "tok:zh" in saved["bleu"]["st"]["zh"]["signature"] and saved["bleu"]["st"]["zh"]["n"] == 3
    assert saved["args"]["num_beams"] == beams and metrics["n"] == 3


@pytest.mark.parametrize("family,beams", [("qwen2", 1), ("qwen2", 2), ("llama_loud", 1), ("llama_loud", 2)])
def test_hypotheses_do_not_depend_on_the_batch_size(trained, manifest, tmp_path, family, beams):
    """ST and MT, greedy and beam: batches of 1 and batches of 4 (+ 1) give the same hypotheses (left padding,
    position ids and beam bookkeeping do not leak across the items of a batch)."""
    ckpt, _ = trained[family]
    hyps = []
    for batch in (1, 4):
        E.main(["--ckpt", ckpt, "--manifest", manifest, "--mode", "st", "mt", "--num-beams", str(beams),
                "--max-new-tokens", "6", "--batch-size", str(batch), "--num-workers", "0",
                "--output-dir", str(tmp_path / f"b{batch}")])
        hyps.append({mode: [h["hypothesis"] for h in read_jsonl(tmp_path / f"b{batch}" / f"hyps.{mode}.jsonl")]
                     for mode in ("st", "mt")})
    assert hyps[0] == hyps[1]
    # outputs that depend on the input (a constant string would hide a mix-up between the items of a batch)
    assert len(set(hyps[0]["mt"])) == 5 and (family != "llama_loud" or len(set(hyps[0]["st"])) == 5), hyps[0]


def test_manifest_evaluation_records_the_paired_bootstrap(trained, manifest, tmp_path, capsys, monkeypatch):
    """--baseline-hyps: metrics.json holds, per mode, the paired bootstrap of --hyps SYS --baseline BASE on the two
    runs' files, and --table shows its p-value in the system's row."""
    common = ["--manifest", manifest, "--mode", "st", "mt", "--num-beams", "1"] + FAST
    base, sys_ = tmp_path / "base", tmp_path / "sys"
    E.main(["--ckpt", trained["qwen2_b"][0], *common, "--output-dir", str(base), "--name", "base"])
    E.main(["--ckpt", trained["qwen2"][0], *common, "--output-dir", str(sys_), "--name", "AI-STA",
            "--baseline-hyps", str(base)])
    capsys.readouterr()
    saved = json.loads((sys_ / "metrics.json").read_text(encoding="utf-8"))
    base_saved = json.loads((base / "metrics.json").read_text(encoding="utf-8"))
    for mode in ("st", "mt"):
        sc = saved["bleu"][mode]["zh"]
        E.main(["--hyps", str(sys_ / f"hyps.{mode}.jsonl"), "--baseline", str(base / f"hyps.{mode}.jsonl")])
        expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert sc["score"] == expected["bleu"] and sc["chrf"] == expected["chrf"]
        for key in ("bleu", "chrf"):
            assert {k: sc["paired_bs"][key][k] for k in ("mean", "ci", "p")} == expected["paired_bs"][key]
        assert sc["paired_bs"]["baseline_sha256"] == base_saved["bleu"][mode]["zh"]["sha256"]
        assert sc["paired_bs"]["baseline_hyps"] == str(base / f"hyps.{mode}.jsonl")
    E.main(["--table", str(base / "metrics.json"), str(sys_ / "metrics.json")])
    cells = _cells(capsys.readouterr().out.strip())
    assert cells[0][:4] == ["Model", "ST zh", "ST zh chrF", "ST zh p"]
    assert cells[3][0] == "AI-STA" and cells[3][3] == f"{saved['bleu']['st']['zh']['paired_bs']['bleu']['p']:.3f}"
    assert cells[2][3] == ""  # the baseline row has no p-value
    # a baseline of other segments, or a file for two modes: refused before any model is loaded
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded before the baseline check"))
    lines = (base / "hyps.st.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "reordered.jsonl").write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")
    with pytest.raises(data.UserError, match=r"reordered.jsonl: line 1: id 'u1' is out of the order of \S*test.jsonl"):
        E.main(["--ckpt", trained["qwen2"][0], *common[:2], "--limit", "3",
                "--baseline-hyps", str(tmp_path / "reordered.jsonl")])
    (tmp_path / "other.jsonl").write_text(lines[0].replace("你好世界", "你好") + "".join(lines[1:]), encoding="utf-8")
    with pytest.raises(data.UserError, match=r"test.jsonl: line 1 and \S*other.jsonl: line 1 have different references"):
        E.main(["--ckpt", trained["qwen2"][0], *common[:2], "--baseline-hyps", str(tmp_path / "other.jsonl")])
    with pytest.raises(data.UserError, match=r"a file holds one mode's hypotheses; for --mode st mt give the baseline's"):
        E.main(["--ckpt", trained["qwen2"][0], *common, "--baseline-hyps", str(base / "hyps.st.jsonl")])
    with pytest.raises(data.UserError, match=r"hyps.mt.jsonl not found"):
        (base / "hyps.mt.jsonl").unlink()
        E.main(["--ckpt", trained["qwen2"][0], *common, "--baseline-hyps", str(base)])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_hypotheses_as_one(trained, manifest, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): uneven shards (2 + 3 utterances), results gathered in manifest order."""
    ckpt, _ = trained["qwen2"]
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "2", "--mode", "st", "mt",
            "--alignment", "0", "1", "--num-pairs", "3"] + FAST
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "evaluate.py"), *args,
           "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = E.main(args + ["--output-dir", str(tmp_path / "one")])
    for mode in ("st", "mt"):
        a = (tmp_path / "one" / f"hyps.{mode}.jsonl").read_text(encoding="utf-8")
        b = (tmp_path / "two" / f"hyps.{mode}.jsonl").read_text(encoding="utf-8")
        assert a == b and len(a.splitlines()) == 5
    two = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for l in ("0", "1"):
        assert two["alignment"]["log_w"][l] == pytest.approx(one["alignment"]["log_w"][l], rel=1e-5)
    assert "| Model" in proc.stdout and proc.stdout.count("BLEU =") == 2  # rank 0 alone prints


def test_mt_feeds_the_transcript_and_reads_no_audio(trained, manifest, tmp_path, monkeypatch):
    import model as M
    ckpt, lsm = trained["llama"]
    # the same manifest with every audio file missing: MT must not need them
    entries = read_jsonl(manifest)
    no_audio = tmp_path / "mt.jsonl"
    no_audio.write_text("".join(json.dumps(dict(e, audio=f"missing/{e['id']}.wav"), ensure_ascii=False) + "\n"
                                for e in entries), encoding="utf-8")
    def never(*a, **k):
        raise AssertionError("the speech side was used in --mode mt")
    monkeypatch.setattr(M.LSM, "encode_speech", never)
    monkeypatch.setattr(data, "load_audio", never)
    embedded = []
    real_embed = M.LSM._embed_texts
    monkeypatch.setattr(M.LSM, "_embed_texts", lambda self, texts: embedded.extend(texts) or real_embed(self, texts))
    E.main(["--ckpt", ckpt, "--manifest", str(no_audio), "--mode", "mt", "--num-beams", "2",
            "--output-dir", str(tmp_path / "out")] + FAST)
    assert embedded == TRANSCRIPTS  # the transcripts, in order, are what went where the speech goes
    hyps = read_jsonl(tmp_path / "out" / "hyps.mt.jsonl")
    embedded.clear()
    instr = [data.instruction("st", "zh")] * 5  # the ST prompt
    expected = []
    for k in range(0, 5, 2):
        expected += lsm.generate(dict(transcripts=TRANSCRIPTS[k:k + 2], instructions=instr[k:k + 2]),
                                 mode="mt", num_beams=2, max_new_tokens=6)
    assert [h["hypothesis"] for h in hyps] == expected
    assert [h["reference"] for h in hyps] == TRANSLATIONS


def test_audio_files_one_translation_per_line(trained, manifest, capsys):
    ckpt, lsm = trained["qwen2"]
    folder = os.path.dirname(manifest)
    files = [os.path.join(folder, f"u{i}.wav") for i in (3, 0)]
    E.main(["--ckpt", ckpt, "--audio", *files, "--num-beams", "1", "--tgt-lang", "zh"] + FAST)
    out = capsys.readouterr().out
    batch = speech_batch(lsm, manifest, [3, 0])
    assert out == "".join(h + "\n" for h in lsm.generate(batch, mode="st", num_beams=1, max_new_tokens=6))


def test_manifest_errors_name_the_line(trained, manifest, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(manifest, encoding="utf-8").readline()
                   + json.dumps(dict(id="x", audio="u0.wav", task="asr", text="hi")) + "\n")
    with pytest.raises(data.UserError, match=r"bad.jsonl: line 2: task 'asr'"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", str(bad)])
    with pytest.raises(data.UserError, match=r"line 1: invalid JSON"):
        bad.write_text("{oops\n")
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", str(bad)])
    with pytest.raises(data.UserError, match=r"--alignment 0 4: the LLM has layers 0 \(embeddings\) .. 3"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--alignment", "0", "4"])
    with pytest.raises(data.UserError, match="nothing.safetensors.json"):
        E.main(["--ckpt", str(tmp_path / "nothing.safetensors"), "--manifest", manifest])
    for bad_args in (["--manifest", manifest],  # no --ckpt
                     ["--hyps", "h", "--manifest", manifest],  # two inputs
                     ["--ckpt", "c", "--audio", "a.wav", "--mode", "mt"],  # no transcript for MT
                     ["--ckpt", "c", "--manifest", "m", "--mode", "none"]):  # nothing to do
        with pytest.raises(SystemExit):  # argparse's usage error
            E.main(bad_args)

# ----------------------------------------------------------------------------- alignment degree, Figure 5


def planted(B=6, d=16, seed=0):
    """Text clouds t_i (m_i tokens) and speech clouds that are t_i's points, each repeated twice (as several
    windows per word) plus small noise; padding filled with garbage that the masks must hide."""
    g = torch.Generator().manual_seed(seed)
    m = [3, 5, 4, 6, 2, 5][:B]
    text = torch.full((B, max(m), d), 1e4)
    speech = torch.full((B, 2 * max(m) + 1, d), -1e4)
    tmask = torch.zeros(B, max(m), dtype=torch.bool)
    smask = torch.zeros(B, speech.shape[1], dtype=torch.bool)
    for i, mi in enumerate(m):
        t = 3.0 * torch.randn(mi, d, generator=g)
        text[i, :mi], tmask[i, :mi] = t, True
        speech[i, :2 * mi] = t.repeat_interleave(2, 0) + 0.1 * torch.randn(2 * mi, d, generator=g)
        smask[i, :2 * mi] = True
    return speech, smask, text, tmask


def test_alignment_degree_lower_for_true_pairs_on_a_planted_case():
    speech, smask, text, tmask = planted()
    matched = E.alignment_degree(speech, smask, text, tmask)
    mismatched = E.alignment_degree(speech, smask, text, tmask, shift=1)
    assert np.isfinite(matched) and np.isfinite(mismatched)
    assert matched < mismatched - 2.0  # W about 0.01 * d vs 2 * 9 * d: log-ratio ~ 7
    # the formula: mean over pairs of log ot.wasserstein, padding ignored
    w = ot.wasserstein(speech, text, smask, tmask)
    assert matched == pytest.approx(w.log().mean().item(), rel=1e-6)
    for i in range(3):
        n, m = int(smask[i].sum()), int(tmask[i].sum())
        alone = E.alignment_degree(speech[i:i + 1, :n], smask[i:i + 1, :n], text[i:i + 1, :m], tmask[i:i + 1, :m])
        assert alone == pytest.approx(w[i].log().item(), rel=1e-4, abs=1e-4)
    # identical clouds: W may be ~0, the log stays finite
    assert np.isfinite(E.alignment_degree(text, tmask, text.clone(), tmask))


def test_alignment_and_tsne_on_the_tiny_model(trained, manifest, tmp_path):
    import matplotlib.image
    ckpt, lsm = trained["qwen2"]
    png = tmp_path / "fig5.png"
    metrics = E.main(["--ckpt", ckpt, "--manifest", manifest, "--mode", "none", "--alignment", "0", "1",
                      "--tsne", str(png), "--num-pairs", "4", "--batch-size", "4", "--num-workers", "0",
                      "--output-dir", str(tmp_path / "out")])
    assert metrics["bleu"] == {} and not (tmp_path / "out" / "hyps.st.jsonl").exists()
    a = json.loads((tmp_path / "out" / "metrics.json").read_text())["alignment"]
    assert a["layers"] == [0, 1] and a["num_pairs"] == 4
    assert all(np.isfinite(v) for v in [*a["log_w"].values(), *a["mismatched"].values()])
    # recompute layer 0 and 1 from the model for the same seeded pairs (one batch of 4)
    import random
    pairs = random.Random(0).sample(range(5), 4)
    batch = speech_batch(lsm, manifest, pairs)
    with torch.no_grad():
        out = lsm.speech_forward(batch, [0, 1])
        text, tmask = lsm.text_forward(batch["transcripts"], batch["instructions"], [0, 1])
    for l in (0, 1):
        expected = E.alignment_degree(out["hidden"][l], out["speech_mask"], text[l], tmask)
        assert a["log_w"][str(l)] == pytest.approx(expected, rel=1e-5)
        shifted = E.alignment_degree(out["hidden"][l], out["speech_mask"], text[l], tmask, shift=1)
        assert a["mismatched"][str(l)] == pytest.approx(shifted, rel=1e-5)
    assert a["mean"] == pytest.approx((a["log_w"]["0"] + a["log_w"]["1"]) / 2)
    # Figure 5: a real PNG of the promised size
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (round(results.FIG_INCHES[1] * results.FIG_DPI), round(results.FIG_INCHES[0] * results.FIG_DPI))
    assert img[..., :3].std() > 0.01  # something is drawn
    assert metrics["tsne"]["num_pairs"] == 4


def test_figure5_two_panels_from_two_checkpoints(trained, manifest, tmp_path, monkeypatch):
    """--tsne with --tsne-base: one PNG, the base model's panel then the --ckpt model's, each from the same seeded
    test pairs, with the same t-SNE settings."""
    import random
    import matplotlib.image
    (ckpt, lsm), (base_ckpt, base_lsm) = trained["qwen2"], trained["qwen2_b"]
    drawn, real = [], results.tsne_panels
    monkeypatch.setattr(results, "tsne_panels", lambda panels, path, seed=0: drawn.append(panels) or real(panels, path, seed))
    png = tmp_path / "fig5.png"
    metrics = E.main(["--ckpt", ckpt, "--manifest", manifest, "--mode", "none", "--tsne", str(png), "--name", "AI-STA",
                      "--tsne-base", base_ckpt, "--tsne-base-name", "base (CE only)", "--num-pairs", "4",
                      "--batch-size", "4", "--num-workers", "0", "--output-dir", str(tmp_path / "out")])
    (panels,) = drawn
    assert [p[0] for p in panels] == ["base (CE only)", "AI-STA"] == metrics["tsne"]["panels"]
    batch = speech_batch(lsm, manifest, random.Random(0).sample(range(5), 4))  # the pairs --seed 0 samples
    with torch.no_grad():
        for (_, speech, text), model in zip(panels, (base_lsm, lsm)):
            out = model.speech_forward(batch, [0])
            t, tmask = model.text_forward(batch["transcripts"], batch["instructions"], [0])
            np.testing.assert_allclose(speech, M.masked_mean(out["hidden"][0], out["speech_mask"]).numpy(), rtol=1e-5)
            np.testing.assert_allclose(text, M.masked_mean(t[0], tmask).numpy(), rtol=1e-5)
    # layer-0 text states are the frozen LLM's token embeddings: the same in both models; the speech side is not
    np.testing.assert_array_equal(panels[0][2], panels[1][2])
    assert np.abs(panels[0][1] - panels[1][1]).max() > 1e-3
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (round(results.FIG_INCHES[1] * results.FIG_DPI), round(2 * results.FIG_INCHES[0] * results.FIG_DPI))
    # the same settings in every panel: the same states give the same picture
    xy = results.tsne_panels([("a", panels[1][1], panels[1][2]), ("b", panels[1][1], panels[1][2])], str(tmp_path / "s.png"))
    np.testing.assert_array_equal(xy[0], xy[1])
    with pytest.raises(SystemExit):  # argparse: --tsne-base needs --tsne
        E.main(["--ckpt", ckpt, "--manifest", manifest, "--tsne-base", base_ckpt])


def test_tsne_separates_planted_modalities(tmp_path):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    speech, text = rng.normal(0, 1, (20, 8)) + 10, rng.normal(0, 1, (20, 8)) - 10
    xy = results.tsne_figure(speech, text, str(tmp_path / "f.png"))
    assert xy.shape == (40, 2)
    # the two clusters stay apart in 2-D: every speech point is closer to the speech centre than to the text one
    cs, ct = xy[:20].mean(0), xy[20:].mean(0)
    assert (np.linalg.norm(xy[:20] - cs, axis=1) < np.linalg.norm(xy[:20] - ct, axis=1)).all()


def test_tsne_without_scikit_learn_fails_before_loading_the_model(trained, manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded before the dependency check"))
    with pytest.raises(data.UserError, match="pip install scikit-learn matplotlib"):
        E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--tsne", str(tmp_path / "f.png")])

# ----------------------------------------------------------------------------- summary table


def test_summary_table_in_the_form_of_the_papers_tables(tmp_path, capsys):
    base = dict(name="base (Qwen2-7B)", bleu={"st": {"zh": {"score": 45.31}}, "mt": {"zh": {"score": 51.2}}})
    ista = dict(name="w/ AI-STA", bleu={"st": {"zh": {"score": 46.04}, "ja": {"score": 31.4}}},
                alignment=dict(layers=[0, 1], log_w={"0": 1.23456, "1": 2.5}, mean=1.86728, mismatched_mean=3.0))
    table = results.summary_table([base, ista]).splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert cells[0] == ["Model", "ST zh", "MT zh", "ST ja", "log W L0", "log W L1", "log W mean", "mismatched"]
    assert cells[2] == ["base (Qwen2-7B)", "45.3", "51.2", "-", "-", "-", "-", "-"]
    assert cells[3] == ["w/ AI-STA", "46.0", "-", "31.4", "1.235", "2.500", "1.867", "3.000"]
    paths = []
    for i, m in enumerate((base, ista)):
        paths.append(str(tmp_path / f"m{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(m, f)
    E.main(["--table", *paths])
    assert capsys.readouterr().out.splitlines() == table


def _run(name, seed, st, chrf=None, sha=None, against=None, p=None, align=None, layers=(0,)):
    """A metrics.json as evaluate.py writes it (the fields --table and --fig6 read)."""
    sc = dict(score=st, signature="tok:zh", n=10)
    if chrf is not None:
        sc.update(chrf=chrf, chrf_signature="nc:6")
    if sha is not None:
        sc["sha256"] = sha
    if against is not None:
        sc["paired_bs"] = dict(bleu=dict(mean=st, ci=1.0, p=p), chrf=dict(mean=chrf, ci=1.0, p=p),
                               baseline_sha256=against)
    m = dict(name=name, train=dict(seed=seed), bleu={"st": {"zh": sc}})
    if align is not None:
        m["alignment"] = dict(layers=list(layers), log_w={str(l): align for l in layers}, mean=align,
                              mismatched_mean=align + 1)
    return m


def _cells(table):
    return [[c.strip() for c in row.strip("|").split("|")] for row in table.splitlines()]


def test_table_over_seeds_mean_sd_and_same_seed_pvalues(tmp_path, capsys):
    base = [_run("base", k, st, 50 + k, sha=f"b{k}", align=5.0 + k / 10) for k, st in enumerate([30, 32, 34, 31, 33])]
    sta = [_run("AI-STA", k, st, 60, f"a{k}", f"b{k}", p, align=4.0)
           for k, (st, p) in enumerate([(35, 0.001), (36, 0.02), (40, 0.3)])]
    swapped = [_run("swapped", 0, 30, 50, "w0", "b1", 0.01), _run("swapped", 1, 30, 50, "w1", "b0", 0.01)]
    partial = [_run("partial", 0, 30, 50, "q0", "b0", 0.04), _run("partial", 1, 31, 50, "q1")]
    many = [_run("many", k, 30, 50, f"m{k}", f"b{k}", p) for k, p in enumerate([0.01, 0.2, 0.03, 0.04, 0.5])]
    other = [_run("vs another baseline", 0, 30, 50, "o0", "not-a-base-run", 0.01)]
    same = [_run("same as base", 0, 30, 50, "b0", "b0", 1 / 1001), _run("same as base", 1, 31, 50, "s1", "b1", 0.5)]
    cells = _cells(results.summary_table(base + sta + swapped + partial + many + other + same))
    assert cells[0] == ["Model", "seeds", "ST zh", "ST zh chrF", "ST zh p", "log W L0", "log W mean", "mismatched"]
    rows = {r[0]: r[1:] for r in cells[2:]}
    # by hand: mean 32, sample sd sqrt(10 / 4) = 1.58; chrF 50..54 -> 52 ± 1.58; log W 5.0..5.4 -> 5.2 ± 0.158
    assert rows["base"] == ["5", "32.0 ± 1.6", "52.0 ± 1.6", "", "5.200 ± 0.158", "5.200 ± 0.158", "6.200 ± 0.158"]
    # 35, 36, 40: mean 37, sd sqrt((4 + 1 + 9) / 2) = 2.65; each seed's p against the same-seed base run
    assert rows["AI-STA"] == ["3", "37.0 ± 2.6", "60.0 ± 0.0", "0.001, 0.020, 0.300", "4.000 ± 0.000",
                              "4.000 ± 0.000", "5.000 ± 0.000"]
    assert rows["swapped"][3] == "-"  # against base runs of other seeds: no same-seed p-value
    assert rows["partial"][3] == "0.040 (1 of 2 seeds)"
    assert rows["many"][3] == "median 0.040, 3/5 < 0.05"
    assert rows["vs another baseline"][3] == "-"  # its baseline is not a run of the first system
    assert rows["many"][4:] == ["-", "-", "-"]
    # hypotheses identical to the baseline's: no difference, whatever SacreBLEU's p (its floor, 1/1001) says
    assert rows["same as base"][3] == "same, 0.500"
    assert results.p_cell([None, 0.01, 0.02, 0.5], 4) == "median 0.260, 2/4 < 0.05"  # "same" counts as p = 1
    # the same from files, through the command line
    paths = []
    for i, m in enumerate(base + sta):
        paths.append(str(tmp_path / f"m{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(m, f)
    E.main(["--table", *paths])
    assert capsys.readouterr().out.strip() == results.summary_table(base + sta)
    # the first system is the baseline of the p-values: the other order shows none
    assert "ST zh p" not in results.summary_table(sta + base).splitlines()[0]


def test_malformed_metrics_files_are_named_without_a_traceback(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_run("base", 0, 30.0)))
    bad = tmp_path / "bad.json"
    for body, message in [("{oops", r"bad.json: not a metrics file: invalid JSON at line 1"),
                          ("[1, 2]", r"bad.json: not a metrics file: a JSON list, not an object"),
                          (json.dumps({"bleu": []}), r'bad.json: "bleu" must be an object'),
                          (json.dumps({"bleu": {"st": {"zh": {"score": "high"}}}}),
                           r"""bad.json: "bleu" -> 'st' -> 'zh' -> 'score' must be a number, got 'high'"""),
                          (json.dumps({"alignment": {"layers": [0], "log_w": {"0": [1]}, "mean": 1}}),
                           r"""bad.json: "alignment" -> "log_w" -> '0' must be a number"""),
                          (json.dumps({"name": 3}), r'bad.json: "name" must be a string')]:
        bad.write_text(body)
        with pytest.raises(data.UserError, match=message):
            E.main(["--table", str(good), str(bad)])
    # a bare NaN (files of older versions) reads as a missing value
    bad.write_text('{"name": "nan run", "bleu": {"st": {"zh": {"score": NaN}}}}')
    assert _cells(results.summary_table([results.read_metrics(str(bad))]))[2] == ["nan run", "-"]
    # the command line: one line naming the file, no traceback; a missing file likewise
    bad.write_text('{"bleu": {"st": {"zh": {"score": "high"}}}}')
    for missing in (str(bad), str(tmp_path / "missing.json")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--table", str(good), missing],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("evaluate.py: error: ") and os.path.basename(missing) in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_figure6_one_point_per_system_mean_over_seeds(tmp_path):
    import matplotlib.image
    runs = [_run("base", k, 30 + k, align=5 + k) for k in range(3)] + \
        [_run("AI-STA", k, 36 + 2 * k, align=3.0) for k in range(2)] + [_run("CTC", 0, 28, align=6.5)]
    paths = [f"m{i}.json" for i in range(len(runs))]
    png = tmp_path / "fig6.png"
    points = results.figure6(runs, paths, str(png))
    assert points == [("base", 6.0, 31.0, 3), ("AI-STA", 3.0, 37.0, 2), ("CTC", 6.5, 28.0, 1)]
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (round(results.FIG6_INCHES[1] * results.FIG_DPI), round(results.FIG6_INCHES[0] * results.FIG_DPI))
    assert img[..., :3].std() > 0.01
    # one degree across runs: the same layers everywhere, and every run measured
    with pytest.raises(data.UserError, match=r"m1.json: alignment measured at layers \[0, 1\], m0.json at \[0\]"):
        results.figure6([runs[0], _run("x", 0, 30, align=4, layers=(0, 1))], paths, str(png))
    with pytest.raises(data.UserError, match=r"m1.json: no alignment degree"):
        results.figure6([runs[0], _run("x", 0, 30)], paths, str(png))


def test_mrr_table_is_figure_4(tmp_path, capsys):
    f = tmp_path / "layers.json"
    f.write_text(json.dumps(dict(mrr={"0": 0.5, "1": 0.25, "2": 0.01}, selected=[0, 1], threshold=0.05, num_pairs=4)))
    E.main(["--mrr", str(f)])
    out = capsys.readouterr().out
    assert "| 0 | 0.5000 | yes |" in out and "| 2 | 0.0100 |  |" in out
    assert "chance level MRR = H_n / n = 0.5208" in out  # (1 + 1/2 + 1/3 + 1/4) / 4
    f.write_text(json.dumps(dict(selected=[0])))
    with pytest.raises(data.UserError, match="layers.json: not select_layers.py's layers.json"):
        E.main(["--mrr", str(f)])


def test_command_line_and_tables_need_no_model_stack(tmp_path):
    """evaluate.py's flags (model and OT flags from config.py), --mrr and --table load neither model.py nor
    transformers or peft: those start in seconds."""
    f = tmp_path / "layers.json"
    f.write_text(json.dumps(dict(mrr={"0": 0.5}, selected=[0], threshold=0.05, num_pairs=4)))
    code = ("import sys, evaluate; evaluate.build_parser(); evaluate.main(['--mrr', sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'transformers', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code, str(f)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_help_shows_the_defaults():
    text = E.build_parser().format_help()
    for flag, default in [("--num-beams", "4"), ("--max-new-tokens", "200"), ("--num-pairs", "1000")]:
        i = text.index("\n  " + flag)
        assert f"(default: {default})" in " ".join(text[i:i + 400].split())

# ----------------------------------------------------------------------------- robustness (issue 11.1, 11.4, 13)


def _manifest_with_missing_clip(manifest, tmp_path, missing=2):
    """The test manifest with entry `missing`'s audio absent (a typo or a failed download)."""
    rows = read_jsonl(manifest)
    folder = os.path.dirname(manifest)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(dict(r, audio=os.path.join(folder, r["audio"]) if i != missing else "gone.wav"),
                                       ensure_ascii=False) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return str(path)


def _counting_generate(monkeypatch, fail_at=None):
    """Patch LSM.generate to count its calls (and raise at call `fail_at`, as a kill would)."""
    import model as M
    calls, real = [], M.LSM.generate

    def generate(self, batch, **kw):
        calls.append(list(batch["ids"]))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(self, batch, **kw)
    monkeypatch.setattr(M.LSM, "generate", generate)
    return calls


def test_killed_evaluation_resumes_where_it_stopped(trained, manifest, tmp_path, monkeypatch):
    """Issue 11.4: hypotheses are written as they are decoded; a run killed in its 2nd batch, run again, decodes
    only the missing batches and writes exactly the uninterrupted run's files. Other settings discard the partial
    results instead of mixing them in."""
    ckpt, _ = trained["qwen2"]
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "1"] + FAST
    E.main(args + ["--output-dir", str(tmp_path / "ref")])
    out = tmp_path / "out"
    calls = _counting_generate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        E.main(args + ["--output-dir", str(out)])
    partial = read_jsonl(out / "partial" / "hyps.st.rank0.jsonl")
    assert [r["id"] for r in partial] == ["u0", "u1"] and not (out / "metrics.json").exists()
    with open(out / "partial" / "hyps.st.rank0.jsonl", "a", encoding="utf-8") as f:
        f.write('{"index": 2, "id": "u2", "hypo')  # the kill also cut a line short
    calls = _counting_generate(monkeypatch)
    E.main(args + ["--output-dir", str(out)])
    assert calls == [["u2", "u3"], ["u4"]]  # only the missing batches
    for name in ("hyps.st.jsonl",):
        assert (out / name).read_text(encoding="utf-8") == (tmp_path / "ref" / name).read_text(encoding="utf-8")
    assert not (out / "partial").exists()
    # a killed run with other settings: its partial hypotheses are not reused
    calls = _counting_generate(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        E.main(args + ["--output-dir", str(out)])
    calls = _counting_generate(monkeypatch)
    E.main(["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "2"] + FAST + ["--output-dir", str(out)])
    assert len(calls) == 3


def test_skip_bad_scores_the_rest_and_lists_the_skipped(trained, manifest, tmp_path, monkeypatch, capsys):
    """Issue 11.4: a missing clip at line 3 stopped the evaluation with nothing written. Now the error names the entry
    without losing the batches before it, and --skip-bad scores the rest, listing the skipped ids (said on stderr)."""
    ckpt, _ = trained["qwen2"]
    bad = _manifest_with_missing_clip(manifest, tmp_path)
    args = ["--ckpt", ckpt, "--manifest", bad, "--num-beams", "1", "--output-dir", str(tmp_path / "out")] + FAST
    with pytest.raises(data.AudioError, match=r"entry 'u2' \(.*m\.jsonl: line 3\): audio file not found"):
        E.main(args)
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "partial" / "hyps.st.rank0.jsonl")] == ["u0", "u1"]
    calls = _counting_generate(monkeypatch)
    res = E.main(args + ["--skip-bad"])
    assert calls == [["u3"], ["u4"]]  # u0, u1 kept from the failed run; u2 left out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["skipped"] == {"st": ["u2"]} and saved["bleu"]["st"]["zh"]["n"] == 4
    hyps = read_jsonl(tmp_path / "out" / "hyps.st.jsonl")
    assert [h["id"] for h in hyps] == ["u0", "u1", "u3", "u4"]
    refs = [[TRANSLATIONS[i] for i in (0, 1, 3, 4)]]
    bleu = sacrebleu.corpus_bleu([h["hypothesis"] for h in hyps], refs, tokenize="zh")
    assert saved["bleu"]["st"]["zh"]["score"] == pytest.approx(bleu.score) and res["n"] == 5
    captured = capsys.readouterr()
    assert "--skip-bad: 1 of 5 entries have unreadable audio and are NOT in the st BLEU below: ['u2']" in captured.err
    assert "ST zh (4 segments, 1 skipped)" in captured.out


def test_metrics_json_is_strict_json_with_a_nan(trained, manifest, tmp_path, monkeypatch):
    """Issue 11.1: a NaN alignment degree was written as a bare NaN, which is not JSON."""
    monkeypatch.setattr(E, "log_wasserstein", lambda *a, **k: torch.full((a[0].shape[0],), float("nan")))
    E.main(["--ckpt", trained["qwen2"][0], "--manifest", manifest, "--mode", "none", "--alignment", "0",
            "--num-pairs", "2", "--output-dir", str(tmp_path)] + FAST)
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert saved["alignment"]["log_w"]["0"] is None
    assert E.finite_json({"a": [1.0, float("inf")], "b": float("nan")}) == {"a": [1.0, None], "b": None}


def test_table_of_a_malformed_file_is_named(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"bleu": {"st": ', encoding="utf-8")
    with pytest.raises(data.UserError, match=r"metrics\.json: not a metrics file: invalid JSON at line 1"):
        E.main(["--table", str(bad)])
    bad.write_text('[1, 2]', encoding="utf-8")
    with pytest.raises(data.UserError, match="metrics.json: not a metrics file: a JSON list, not an object"):
        E.main(["--table", str(bad)])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--table", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith(f"evaluate.py: error: {bad}: not a metrics file")
    assert "Traceback" not in proc.stderr


SLOW_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import model
real = model.LSM.generate
def generate(self, *a, **k):
    if os.environ.get("RANK") == "1":
        time.sleep({seconds})
    return real(self, *a, **k)
model.LSM.generate = generate
import evaluate
evaluate.main(sys.argv[1:])
"""


def test_a_rank_slower_than_the_timeout_does_not_end_a_finished_evaluation(trained, manifest, tmp_path):
    """Issue 13: rank 1 decodes ~5 s longer than rank 0 while --dist-timeout is 3 s (0.05 min). No collective waits on
    the decoding (rank 0 merges the per-rank files), so the evaluation ends normally, with the one-process result;
    --alignment runs after both ranks have finished decoding."""
    ckpt, _ = trained["qwen2"]
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK.format(root=ROOT, seconds=2.5))
    args = ["--ckpt", ckpt, "--manifest", manifest, "--num-beams", "1", "--alignment", "0", "--num-pairs", "3",
            "--dist-timeout", "0.05"] + FAST
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *args, "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    E.main(args[:-2] + ["--output-dir", str(tmp_path / "one")])
    a = (tmp_path / "one" / "hyps.st.jsonl").read_text(encoding="utf-8")
    assert a == (tmp_path / "two" / "hyps.st.jsonl").read_text(encoding="utf-8") and len(a.splitlines()) == 5
    assert json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))["world_size"] == 2



CLOSING = """
import os, sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
sys.setswitchinterval({interval})  # a thread waits this long for the GIL, as on a loaded CPU by chance
script = sys.argv.pop(1)
if script == "evaluate":
    import evaluate
    evaluate.main(sys.argv[1:])
else:
    import toy_objective
    toy_objective.main(sys.argv[1:])
tasks = "/proc/self/task"  # Linux: the threads' names
names = [open(os.path.join(tasks, t, "comm")).read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
if any("gloo" in n for n in names):
    sys.exit(f"rank {{os.environ['RANK']}}: gloo threads alive after the run: {{sorted(names)}}")
"""


def test_every_rank_leaves_the_process_group_cleanly_run_after_run(trained, manifest, tmp_path):
    """Evaluations and trainings (tests/toy_objective.py) under torchrun (2 processes, gloo), 3 of each in
    a row, all end with status 0. A rank used to abort at exit ("terminate called without an active exception"):
    the group outlived destroy_process_group and one of its worker threads freed the last collective's tensors
    after the interpreter had begun to exit. The script below widens that window (a long GIL switch interval) and
    fails a rank whose gloo threads are still alive after the run (the group was not destroyed)."""
    ckpt, _ = trained["qwen2"]
    script = tmp_path / "closing.py"
    script.write_text(CLOSING.format(root=ROOT, interval=1.0))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    runs = dict(evaluate=["--ckpt", ckpt, "--manifest", manifest, "--mode", "st", "--num-beams", "1", "--alignment",
                          "0", "--num-pairs", "3"] + FAST,
                toy=["--batch-size", "4", "--lr", "0.01", "--max-steps", "3", "--warmup-steps", "1", "--dtype",
                     "float32", "--num-workers", "0"])
    for k in range(3):
        for name, flags in runs.items():
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(script), name, *flags, "--output-dir",
                   str(tmp_path / f"{name}{k}")]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{name}, run {k + 1}: {proc.stderr[-3000:]}"
    hyps = {(tmp_path / f"evaluate{k}" / "hyps.st.jsonl").read_text(encoding="utf-8") for k in range(3)}
    assert len(hyps) == 1 and len(hyps.pop().splitlines()) == 5
    ends = [read_jsonl(tmp_path / f"toy{k}" / "metrics.jsonl")[-1] for k in range(3)]
    assert all(e["event"] == "end" and e["step"] == 3 and e["max_param_diff_across_ranks"] == 0.0 for e in ends)

def test_temporaries_of_a_killed_evaluation_are_its_own_files_only(tmp_path):
    """A kill during write_atomic leaves `<file>.tmp<pid>` beside hyps.*.jsonl / metrics.json; run() removes those
    (runtime.clean_temporaries with evaluate.OWN_FILES) and nothing else of the folder."""
    left = ["hyps.st.jsonl.tmp123", "hyps.mt.jsonl.tmp7", "metrics.json.tmp4242"]
    kept = ["hyps.st.jsonl", "metrics.json", "notes.tmp1", "metrics.json.bak"]
    for name in left + kept:
        (tmp_path / name).write_text("x", encoding="utf-8")
    assert sorted(runtime.clean_temporaries(str(tmp_path), E.OWN_FILES)) == sorted(left)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    E.write_atomic(str(tmp_path / "metrics.json"), '{"bleu": "繁"}')  # UTF-8 whatever the locale
    assert (tmp_path / "metrics.json").read_text(encoding="utf-8") == '{"bleu": "繁"}'
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
