"""Tiny random checkpoints with the real formats, for tests and the CPU demo (no network).

    write_tiny_checkpoints(folder, llm="qwen2") -> dict(whisper=dir, beats=file, llm=dir)

writes
    folder/whisper/     WhisperModel (d_model 64, 2 encoder layers, 80 mel bins, 1500 source positions, so the
                        encoder insists on 3000 mel frames like large-v2) + WhisperFeatureExtractor, save_pretrained
    folder/beats/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt
                        tiny BEATs in the official {cfg, model, label_dict} format (beats.write_tiny_beats)
    folder/qwen2/       Qwen2ForCausalLM (hidden 64, 3 layers, GQA 4/2 heads) + Qwen2 tokenizer: byte-level BPE with
                        Qwen2's pre-tokenizer, <|endoftext|> (eos, pad, no bos), <|im_start|>, <|im_end|>,
                        <|audio_bos|>, <|audio_eos|>
 or folder/llama/       LlamaForCausalLM (same sizes) + Llama tokenizer: BPE with byte fallback and the "▁" metaspace,
                        <unk> 0, <s> 1 (bos), </s> 2 (eos), no pad -- the layout of Vicuna's tokenizer

all loadable with `AutoTokenizer.from_pretrained(dir)` / `AutoModelForCausalLM.from_pretrained(dir)` /
`WhisperModel.from_pretrained(dir)` exactly like the real ones. Weights are seeded, so a folder is reproducible;
a folder that is already complete is reused (cheap session fixtures).
"""
import json
import os

import torch

# Sentences the tokenizers learn their merges from: the prompts and the words the tests use.
CORPUS = [
    "USER: <Speech></Speech> Recognize the speech and give me the transcription.\nASSISTANT:",
    "Translate the speech into Chinese.", "Translate the speech into Japanese.",
    "Please describe the audio.", "Recognize the speech and give me the transcription.",
    "hello world this is a test of the tiny model", "a man is speaking while a dog barks in the distance",
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "one two three four five six seven eight nine ten", "你好世界 这是一个测试", "こんにちは世界",
]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>"]
LLAMA_SPECIAL = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # byte-fallback pieces


def _train_bpe(pre_tokenizer, special_tokens, vocab_size, normalizer=None, alphabet=()):
    """Train a BPE model on CORPUS with the `tokenizers` library -> (vocab dict, merges list of pairs)."""
    from tokenizers import Tokenizer, models, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=list(alphabet), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def tiny_qwen2_tokenizer():
    """Qwen2's tokenizer pipeline (NFC, Qwen2 split regex, byte-level BPE) with a vocabulary learned on CORPUS."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers.models.qwen2 import tokenization_qwen2 as tq
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tq.PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _train_bpe(pre, ["<|endoftext|>"], 420, normalizers.NFC(), pre_tokenizers.ByteLevel.alphabet())
    tok = tq.Qwen2Tokenizer(vocab=vocab, merges=merges)  # eos = pad = unk = <|endoftext|>, bos None (as Qwen2-7B)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL[1:]])
    return tok


def tiny_llama_tokenizer():
    """Llama/Vicuna layout: <unk>=0, <s>=1, </s>=2, 256 byte-fallback pieces, then BPE pieces with the "▁" prefix."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    vocab, merges = _train_bpe(pre, LLAMA_SPECIAL, 560)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _write_llm(folder, family):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    tok = tiny_qwen2_tokenizer() if family == "qwen2" else tiny_llama_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                 pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _write_whisper(folder):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    cfg = WhisperConfig(vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    WhisperModel(cfg).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)


def write_tiny_checkpoints(folder, llm="qwen2", seed=0):
    """Write (or reuse) tiny Whisper, BEATs and `llm` ("qwen2" | "llama") checkpoints under `folder`.

    Returns dict(whisper=<dir>, beats=<.pt file>, llm=<dir>)."""
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError("tiny.py builds its tokenizers with the transformers 5 tokenizer classes "
                           f"(Qwen2Tokenizer(vocab=, merges=)); found transformers {transformers.__version__}")
    if llm not in ("qwen2", "llama"):
        raise ValueError(f"write_tiny_checkpoints: llm must be 'qwen2' or 'llama', got {llm!r}")
    import beats  # imported here: only needed when the BEATs checkpoint is written
    paths = dict(whisper=os.path.join(folder, "whisper"),
                 beats=os.path.join(folder, "beats", beats.BEATS_CKPT_NAME),
                 llm=os.path.join(folder, llm))
    writers = dict(whisper=_write_whisper, beats=beats.write_tiny_beats, llm=lambda p: _write_llm(p, llm))
    for name, path in paths.items():
        done = path + ".done"  # written last, so an interrupted write is redone
        if os.path.exists(done):
            continue
        os.makedirs(os.path.dirname(path) if name == "beats" else path, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            writers[name](path)
        open(done, "w").close()
    return paths


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--llm", choices=["qwen2", "llama"], default="qwen2")
    a = p.parse_args()
    print(json.dumps(write_tiny_checkpoints(a.folder, a.llm), indent=1))
