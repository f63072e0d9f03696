"""User errors of every stage script: one line `<script>.py: error: <message>` naming the file, line or flag, no
traceback (runtime.cli); bugs keep their traceback (issue 11.10)."""
import os
import subprocess
import sys

import pytest

import joint_train
import pretrain
import select_layers
import runtime
from conftest import save_fresh_lsm
from test_train import RUN_FLAGS, ROOT, ST_ROWS, one_thread, tiny_flags, write_manifest  # noqa: F401 (fixture)


def cli_error(capsys, main, script):
    """Run main through runtime.cli -> the stderr it printed (asserting exit status 1 and no traceback)."""
    capsys.readouterr()  # drop what ran before
    with pytest.raises(SystemExit) as e:
        runtime.cli(main, script)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err
    assert err.startswith(f"{script}: error: "), err
    return err


@pytest.fixture(scope="module")
def init(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    path = save_fresh_lsm(tiny_ckpts["qwen2"], str(d / "last.safetensors"))
    return dict(init=path, train=write_manifest(d, "train", ST_ROWS), folder=d)


def test_stage_script_prints_one_line_without_traceback(tmp_path):
    """The real command line (a subprocess): a broken manifest line stops pretrain.py with the file and line."""
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "a", "audio": "a.wav", "task": "asr", "text": "hi"}\n{"id": \n')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--train", str(bad), "--output-dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"pretrain.py: error: {bad}: line 2: invalid JSON (Expecting value)"


def test_init_errors_name_the_file_given(init, tmp_path, capsys):
    run = lambda *flags: lambda: joint_train.main(["--train", init["train"], "--output-dir", str(tmp_path / "o"),
                                                   "--layers", "0", *RUN_FLAGS, *flags])
    missing = tmp_path / "nothing.safetensors"
    err = cli_error(capsys, run("--init", str(missing)), "joint_train.py")
    assert f"{missing}: no such file" in err and ".json" not in err.split("(")[0]  # not the sidecar's name
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not weights")
    err = cli_error(capsys, run("--init", str(text)), "joint_train.py")
    assert f"{text}.json is missing" in err
    with open(init["init"] + ".json") as f:
        (tmp_path / "notes.safetensors.json").write_text(f.read())
    err = cli_error(capsys, run("--init", str(text)), "joint_train.py")
    assert f"{text}: not a readable safetensors file" in err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(init["init"], "rb").read()[:200])
    (tmp_path / "cut.safetensors.json").write_text(open(init["init"] + ".json").read())
    assert f"{cut}: not a readable safetensors file" in cli_error(capsys, run("--init", str(cut)), "joint_train.py")
    empty = tmp_path / "empty_llm"
    empty.mkdir()
    err = cli_error(capsys, run("--init", init["init"], "--llm", str(empty)), "joint_train.py")
    assert f"--llm {empty}: no config.json there" in err and "sentencepiece" not in err
    err = cli_error(capsys, run("--init", init["init"], "--whisper", str(tmp_path / "nowhere")), "joint_train.py")
    assert f"--whisper {tmp_path / 'nowhere'}: no such folder" in err


def test_skip_bad_with_no_usable_entry(init, tmp_path, capsys):
    """joint_train.py used to say `need one positive size ... got [0], [1.0]`."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n')
    err = cli_error(capsys, lambda: joint_train.main(["--init", init["init"], "--train", str(bad), "--layers", "0",
                                                      "--output-dir", str(tmp_path / "o"), "--skip-bad", *RUN_FLAGS]),
                    "joint_train.py")
    assert f"--train {bad}: no usable entry (every line was skipped as broken)" in err
    err = cli_error(capsys, lambda: pretrain.main(["--train", str(bad), "--output-dir", str(tmp_path / "p"),
                                                   "--skip-bad"]), "pretrain.py")
    assert f"--train {bad}: no usable entry (every line was skipped as broken)" in err
    layers = tmp_path / "layers.json"
    layers.write_text("{not json")
    err = cli_error(capsys, lambda: joint_train.main(["--init", init["init"], "--train", init["train"],
                                                      "--layers-from", str(layers),
                                                      "--output-dir", str(tmp_path / "q")]),
                    "joint_train.py")
    assert f"--layers-from {layers}: cannot read it" in err


def test_select_layers_and_a_bad_checkpoint_flag(init, tmp_path, capsys):
    err = cli_error(capsys, lambda: select_layers.main(["--init", init["init"], "--manifest",
                                                        str(tmp_path / "no.jsonl"), "--output-dir", str(tmp_path)]),
                    "select_layers.py")
    assert f"manifest not found: {tmp_path / 'no.jsonl'}" in err
    out = tmp_path / "run"
    joint_train.main(["--init", init["init"], "--train", init["train"], "--layers", "0", "--output-dir", str(out),
                      "--batch-size", "2", "--max-steps", "1", *RUN_FLAGS])
    err = cli_error(capsys, lambda: joint_train.main(["--init", init["init"], "--train", init["train"], "--layers", "0",
                                                      "--output-dir", str(out), "--batch-size", "2", "--max-steps", "1",
                                                      *RUN_FLAGS]), "joint_train.py")
    assert "checkpoint.pt exists: pass --resume" in err


def test_bugs_keep_their_traceback():
    def bug():
        raise RuntimeError("an internal error")
    with pytest.raises(RuntimeError, match="an internal error"):
        runtime.cli(bug, "x.py")
    with pytest.raises(KeyError):
        runtime.cli(lambda: {}["missing"], "x.py")


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    """An unreadable clip without --skip-bad is raised in a DataLoader worker; torch re-raises it in the main process
    with the worker's traceback inside the message, which the command line reduces to the original message."""
    import data
    from torch.utils.data import DataLoader
    from transformers import WhisperFeatureExtractor
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "u0", "audio": "missing.wav", "task": "asr", "text": "hi"}\n')
    ds = data.SpeechDataset(data.read_manifest(str(m)))
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=data.Collator(WhisperFeatureExtractor()))
    err = cli_error(capsys, lambda: next(iter(loader)), "pretrain.py")
    assert err == f"pretrain.py: error: entry 'u0' ({m}: line 1): audio file not found: {tmp_path / 'missing.wav'}\n"
