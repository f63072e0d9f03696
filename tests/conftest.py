"""Shared fixtures: tiny checkpoints written once per session, batches built like data.Collator's."""
import os

import numpy as np
import pytest
import torch

# The tests run thousands of tiny ops and several 2-rank torchrun subprocesses on 2 cores: one thread per
# process avoids oversubscription (measured 4x faster steps under contention). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

import tiny

# Tiny Q-Former for tests (the paper's is 768 hidden, 12 heads, FFN 3072).
TINY_QFORMER = dict(qformer_hidden=32, qformer_heads=2, qformer_ffn=64, qformer_layers=2)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{"qwen2": dict(whisper, beats, llm), "llama": dict(...)}: tiny checkpoints (Whisper and BEATs shared)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder = tmp_path_factory.mktemp("tiny_ckpts")
    return {family: tiny.write_tiny_checkpoints(folder, family) for family in ("qwen2", "llama")}


def have_speech():
    """Whether demo/corpus.py can speak here (the eSpeak NG library and voices of espeakng-loader)."""
    from demo import corpus
    try:
        corpus.get_backend("auto")
        return True
    except RuntimeError:
        return False


def save_fresh_lsm(ckpts, path):
    """A fresh tiny LSM (Whisper only, float32 LLM, tiny Q-Former, seed 0) saved as a stage-1 checkpoint -> path."""
    import model as M
    torch.manual_seed(0)
    lsm = M.LSM(ckpts["whisper"], ckpts["llm"], None, llm_dtype="float32", verbose=False, **TINY_QFORMER)
    lsm.save_trainable(path)
    return path


def make_batch(whisper_dir, seconds, instructions=None, targets=None, transcripts=None, seed=0):
    """A batch as data.Collator builds it, from random noise clips of the given durations (s)."""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    rng = np.random.default_rng(seed)
    wavs = [(0.1 * rng.standard_normal(int(round(s * 16000)))).astype(np.float32) for s in seconds]
    mel = torch.from_numpy(fe(wavs, sampling_rate=16000, return_tensors="np").input_features)  # padded to 30 s
    wav = torch.zeros(len(wavs), max(len(w) for w in wavs))
    for i, w in enumerate(wavs):
        wav[i, :len(w)] = torch.from_numpy(w)
    B = len(wavs)
    return dict(ids=[f"utt{i}" for i in range(B)], mel=mel, wav=wav, wav_lens=torch.tensor([len(w) for w in wavs]),
                instructions=instructions or ["Translate the speech into Chinese."] * B,
                targets=targets or ["你好世界", "hello world"][:B] + ["one two three"] * max(0, B - 2),
                transcripts=transcripts or ["hello world", "the quick brown fox jumps"][:B] + ["a dog"] * max(0, B - 2),
                tasks=["st"] * B, tgt_langs=["zh"] * B)
