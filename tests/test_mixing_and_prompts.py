"""Stage-1 mixing by corpus size (data.mix_shares, pretrain.py's printed lines and args.json "mix", the README's
command against the paper's Table 1) and SALMONN's prompt files read by data.Instructions (issue 9.1, 9.2).
The SALMONN-format files here are written by the tests (nothing of SALMONN's text is in this repository)."""
import json
import os
import re

import numpy as np
import pytest

import data
import pretrain
import train
from test_train import RUN_FLAGS, metrics, one_thread, tiny_flags, write_manifest  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP = data.SALMONN_SPEECH

# ----------------------------------------------------------------------------- mixing


def test_mix_shares_by_hand():
    assert data.mix_shares([300, 100], [1, 1]) == [0.75, 0.25]  # default: in proportion to size
    assert data.mix_shares([300, 100], [1, 3]) == [0.5, 0.5]  # weight 3: as if listed three times
    assert data.mix_shares([300, 100], [1, 0], "size") == [1.0, 0.0]
    assert data.mix_shares([300, 100], [1, 1], "equal") == [0.5, 0.5]  # the old meaning: weights are the shares
    assert data.mix_shares([3000, 300], [1, 0.1], "equal") == pytest.approx([1 / 1.1, 0.1 / 1.1], rel=1e-15)
    # the demo's stage-1 line keeps its shares (ASR 10/11) at both of its corpus sizes
    for n_asr, n_aac in ((3000, 300), (300, 40)):
        assert data.mix_shares([n_asr, n_aac], [1, 0.1], "equal")[0] == pytest.approx(10 / 11, rel=1e-15)
    with pytest.raises(ValueError, match="all 0"):
        data.mix_shares([3, 4], [0, 0])
    with pytest.raises(ValueError, match="'size' or 'equal'"):
        data.mix_shares([3], [1], "uniform")


def test_draws_follow_the_shares():
    """train.epoch_order with the shares: manifest k gets share_k of the draws (binomial, 40k draws: 5 sigma)."""
    sizes = [50, 10, 3]
    shares = data.mix_shares(sizes, [1, 1, 2])
    order = np.array(train.epoch_order(sizes, shares, 40000, seed=0, epoch=0))
    counts = np.array([((order >= lo) & (order < lo + n)).sum() for lo, n in zip(np.cumsum([0] + sizes), sizes)])
    for c, p in zip(counts, shares):
        assert abs(c - 40000 * p) < 5 * np.sqrt(40000 * p * (1 - p)), (counts, shares)


def test_readme_stage1_command_gives_table1_proportions():
    """The README's stage-1 --train list with the paper's corpus sizes (Table 1; the Clotho manifest has 5 captions per
    clip, Table 1 counts its 4K clips) reproduces Table 1's proportions."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    cmd = re.search(r"pretrain\.py \$M[^\n]*\\\n\s*--train ([^\n]+)", readme)
    assert cmd, "no stage-1 command in the README"
    sources = train.parse_manifests(cmd.group(1).split())
    table1 = {"librispeech": 280e3, "gigaspeech": 680e3, "wavcaps": 370e3, "audiocaps": 45e3, "clotho": 4e3}
    entries = {"librispeech": 280e3, "gigaspeech": 680e3, "wavcaps": 370e3, "audiocaps": 45e3, "clotho": 5 * 4e3}
    names = [next(k for k in table1 if k in os.path.basename(path)) for path, _ in sources]
    assert sorted(names) == sorted(table1)
    shares = data.mix_shares([entries[k] for k in names], [w for _, w in sources])
    for k, share in zip(names, shares):
        assert share == pytest.approx(table1[k] / sum(table1.values()), rel=1e-9), k
    aac = sum(s for k, s in zip(names, shares) if k in ("wavcaps", "audiocaps", "clotho"))
    assert aac == pytest.approx(0.304, abs=1e-3)  # captioning ~30% of stage 1, not 60% as with equal shares


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    asr = write_manifest(d, "asr", [dict(id=f"a{i}", task="asr", text="hello world") for i in range(3)])
    aac = write_manifest(d, "aac", [dict(id="c1", task="aac", text="a dog barks in the distance")])
    return dict(asr=asr, aac=aac, folder=d)


def test_pretrain_prints_and_records_the_mix(tiny_ckpts, manifests, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(["--train", manifests["asr"], f"{manifests['aac']}:2", "--output-dir", str(out), "--batch-size", "2",
                   "--max-steps", "2", "--warmup-steps", "1", *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS])
    printed = capsys.readouterr().out
    mix = json.load(open(out / "args.json"))["mix"]
    # 3 ASR entries x 1 : 1 AAC entry x 2 -> 60% / 40%; 2 steps x 2 = 4 draws -> 0.8 and 1.6 passes
    assert [(m["path"], m["entries"], m["weight"]) for m in mix] == [(manifests["asr"], 3, 1.0), (manifests["aac"], 1, 2.0)]
    assert [m["share"] for m in mix] == pytest.approx([0.6, 0.4]) and [m["passes"] for m in mix] == pytest.approx([0.8, 1.6])
    assert "stage-1 mix (--mix-by size; 2 steps x 2 = 4 draws):" in printed
    assert f"{manifests['asr']}: 3 entries, weight 1, share 60.00%, 0.80 passes over it" in printed
    assert f"{manifests['aac']}: 1 entries, weight 2, share 40.00%, 1.60 passes over it" in printed
    out2 = tmp_path / "equal"
    pretrain.main(["--train", manifests["asr"], f"{manifests['aac']}:2", "--mix-by", "equal", "--output-dir", str(out2),
                   "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "1", *tiny_flags(tiny_ckpts["qwen2"]),
                   *RUN_FLAGS])
    assert [m["share"] for m in json.load(open(out2 / "args.json"))["mix"]] == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="--train: the sampling weights .* all 0"):
        pretrain.main(["--train", f"{manifests['asr']}:0", "--output-dir", str(tmp_path / "zero"), "--batch-size", "2",
                       *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS])

# ----------------------------------------------------------------------------- SALMONN's prompt files


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


TRAIN_STYLE = {  # SALMONN's train_prompt.json layout: task -> list, each prompt opening with the placeholder
    "asr": [f"{SP} Write down every word.", f"{SP} What was said?", f"{SP}Transcribe it."],
    "audiocaption": [f"{SP} Tell me what you hear."],
    "translation_ec": [f"{SP} Put this into Chinese.", f"{SP} Chinese, please."],
    "translation_en2ja": [f"{SP} Put this into Japanese."],
    "asr_zh": [f"{SP} 写下来。"], "QA": [f"{SP} {{}}"], "music_description": [f"{SP} Describe the music."],
}
TEST_STYLE = {  # test_prompt.json layout: task -> one prompt
    "asr": f"{SP} Write down every word.", "translation_ec": f"{SP} Put this into Chinese.",
    "translation_en2ja": f"{SP} Put this into Japanese.", "audiocaption": f"{SP} Tell me what you hear.",
    "emotion_recognition": f"{SP} One word for the mood.",
}


def test_salmonn_train_prompts_mapped_and_drawn_per_item(tmp_path, caplog):
    path = write_json(tmp_path / "train_prompt.json", TRAIN_STYLE)
    with caplog.at_level("WARNING"):
        ins = data.Instructions(path, seed=3)
    assert ins.format == "salmonn"
    # the placeholder is dropped (the template places the speech), with the space after it
    assert {ins("asr", key=k) for k in range(60)} == {"Write down every word.", "What was said?", "Transcribe it."}
    assert {ins("st", "zh-CN", key=k) for k in range(40)} == {"Put this into Chinese.", "Chinese, please."}
    assert {ins("st", "ja", key=k) for k in range(10)} == {"Put this into Japanese."}
    assert ins("aac", key=7) == "Tell me what you hear."
    assert ins("st", "de", key=1) == "Translate the speech into German."  # no German prompt in the file: default
    # one prompt per item, seeded: the same in any process and run, different for another seed
    picks = [ins("asr", key=k) for k in range(60)]
    assert picks == [data.Instructions(path, seed=3)("asr", key=k) for k in range(60)]
    assert picks != [data.Instructions(path, seed=4)("asr", key=k) for k in range(60)]
    # tasks with no counterpart are listed in one warning, not an error
    assert "not used: asr_zh, QA, music_description" in caplog.text
    d = ins.describe()
    assert d["prompts"]["st:zh"] == ["Put this into Chinese.", "Chinese, please."]
    assert d["prompts"]["asr"][2] == "Transcribe it." and d["ignored_tasks"] == ["asr_zh", "QA", "music_description"]
    assert d["path"] == str(path) and d["seed"] == 3 and json.loads(json.dumps(d)) == d


def test_salmonn_test_prompts_one_per_task(tmp_path, caplog):
    path = write_json(tmp_path / "test_prompt.json", TEST_STYLE)
    with caplog.at_level("WARNING"):
        ins = data.Instructions(path)
    assert [ins("st", "zh", key=k) for k in range(5)] == ["Put this into Chinese."] * 5  # evaluation: deterministic
    assert ins("st", "ja") == "Put this into Japanese." and ins("asr") == "Write down every word."
    assert "not used: emotion_recognition" in caplog.text


def test_salmonn_prompt_errors(tmp_path):
    bad = write_json(tmp_path / "p.json", {"asr": [f"Please {SP} write it down."]})
    with pytest.raises(ValueError, match=r"p\.json: 'asr': .* puts the speech inside the instruction"):
        data.Instructions(bad)
    write_json(bad, {"asr": [f"{SP}  "]})
    with pytest.raises(ValueError, match="a prompt with no instruction"):
        data.Instructions(bad)
    write_json(bad, {"translation_ec": 3, "asr": f"{SP} ok"})
    with pytest.raises(ValueError, match="'translation_ec' must be a prompt or a non-empty list"):
        data.Instructions(bad)
    bad.write_text('{"asr": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.json: line 1: invalid JSON"):
        data.Instructions(bad)


def test_scripts_record_the_prompts(tiny_ckpts, manifests, tmp_path):
    path = write_json(tmp_path / "train_prompt.json", TRAIN_STYLE)
    out = tmp_path / "run"
    pretrain.main(["--train", manifests["asr"], "--instructions", str(path), "--output-dir", str(out), "--batch-size",
                   "2", "--max-steps", "1", "--warmup-steps", "1", *tiny_flags(tiny_ckpts["qwen2"]), *RUN_FLAGS])
    used = json.load(open(out / "args.json"))["instructions_used"]
    assert used["format"] == "salmonn" and used["prompts"]["asr"] == ["Write down every word.", "What was said?",
                                                                      "Transcribe it."]
    import evaluate
    args = evaluate.build_parser().parse_args(["--ckpt", "x", "--manifest", "m", "--instructions", str(path)])
    bad = write_json(tmp_path / "bad.json", {"asr": [f"x {SP} y"]})
    with pytest.raises(data.UserError, match="--instructions .*bad.json"):
        evaluate.main(["--ckpt", str(out / "last.safetensors"), "--manifest", manifests["asr"], "--instructions",
                       str(bad)])
    assert args.instructions == str(path)
