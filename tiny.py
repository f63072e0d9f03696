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

    write_real_checkpoints(folder, llm="qwen2-7b", layers=None) -> dict(whisper=dir, beats=file, llm=dir)

writes the same three checkpoints, by the same writers, at the real widths of the paper's backbones (REAL_CONFIGS:
Whisper-large-v2, BEATs cpt2, Qwen2-7B or Vicuna-13B v1.1, each from its public config file) with random weights in
the published dtype (Whisper and BEATs float32, Qwen2-7B bfloat16, Vicuna float16). The tokenizers are the tiny
ones (their ids fit any vocabulary; the embedding matrices have the real 152064 / 32000 rows). `layers` overrides
the depth: an int for every component, or {"whisper": n, "beats": n, "llm": n} (Whisper's decoder, unused by the
LSM, gets the encoder's depth). Full depth is 7.6 / 13.0 G parameters (15 / 26 GB): count those on the meta device
with `real_llm_config` / `real_whisper_config` / `real_beats_cfg` instead of writing them. At one layer per
component the folder holds 3.0 GB with Qwen2-7B (the 152064 x 3584 embedding and head are 2 x 1.1 GB) and 1.8 GB
with Vicuna-13B; writing one takes ~25 s and 3 GB of RAM on one CPU core.
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

# The tiny sizes (tests, demo).
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, tie_word_embeddings=False)
TINY_WHISPER = dict(vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                    encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                    max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])

# The real sizes, from the public config files ("source"); "layers" names the depth keys a layer override sets.
# Generation-only fields (Whisper's suppress lists, the LLMs' token ids) are left out or taken from the tokenizer.
REAL_CONFIGS = {
    "whisper-large-v2": dict(
        source="https://huggingface.co/openai/whisper-large-v2/blob/main/config.json", dtype="float32",
        layers=("encoder_layers", "decoder_layers"),
        config=dict(vocab_size=51865, num_mel_bins=80, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                    encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120,
                    max_source_positions=1500, max_target_positions=448, activation_function="gelu",
                    pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
                    suppress_tokens=[], begin_suppress_tokens=[])),
    "beats-cpt2": dict(
        # the cfg dict stored in BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (github.com/microsoft/unilm,
        # beats/README.md), which beats.load_beats reads; training-only fields (dropouts) keep beats.DEFAULTS
        source="cfg of BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, github.com/microsoft/unilm/tree/master/beats",
        dtype="float32", layers=("encoder_layers",),
        config=dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                    encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
                    layer_norm_first=False, deep_norm=True, conv_pos=128, conv_pos_groups=16,
                    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                    finetuned_model=True, predictor_class=527)),
    "qwen2-7b": dict(
        source="https://huggingface.co/Qwen/Qwen2-7B/blob/main/config.json", family="qwen2", dtype="bfloat16",
        layers=("num_hidden_layers",),
        config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072,
                    max_window_layers=28, hidden_act="silu", tie_word_embeddings=False)),
    "vicuna-13b": dict(
        source="https://huggingface.co/lmsys/vicuna-13b-v1.1/blob/main/config.json", family="llama",
        dtype="float16", layers=("num_hidden_layers",),
        config=dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                    num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=2048,
                    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False)),
}
REAL_LLMS = ("qwen2-7b", "vicuna-13b")


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


def _real(name, layers=None):
    """REAL_CONFIGS[name]["config"] with its depth keys set to `layers` (None: the real depth)."""
    spec = REAL_CONFIGS[name]
    cfg = dict(spec["config"])
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"{name}: layers must be a positive int, got {layers!r}")
        cfg.update({key: layers for key in spec["layers"]})
    return cfg


def _llm_config(family, sizes, tok=None):
    from transformers import LlamaConfig, Qwen2Config
    ids = {} if tok is None else dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id)  # the ids of the tokenizer written beside it
    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**{**sizes, **ids})


def real_llm_config(name, layers=None):
    """transformers config of `name` ("qwen2-7b" | "vicuna-13b") at the real sizes, `layers` decoder layers."""
    if name not in REAL_LLMS:
        raise ValueError(f"real LLM must be one of {list(REAL_LLMS)}, got {name!r}")
    return _llm_config(REAL_CONFIGS[name]["family"], _real(name, layers))


def real_whisper_config(layers=None):
    """WhisperConfig of Whisper-large-v2, `layers` encoder (and decoder) layers."""
    from transformers import WhisperConfig
    return WhisperConfig(**_real("whisper-large-v2", layers))


def real_beats_cfg(layers=None):
    """BEATs cpt2 cfg dict (as stored in the checkpoint), `layers` encoder layers."""
    return _real("beats-cpt2", layers)


def _write_llm(folder, family, sizes=TINY_LLM, dtype=None):
    """Tokenizer of `family` + *ForCausalLM of `sizes` (vocabulary: the tokenizer's unless sizes gives one)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM
    tok = tiny_qwen2_tokenizer() if family == "qwen2" else tiny_llama_tokenizer()
    cfg = _llm_config(family, {"vocab_size": len(tok), **sizes}, tok)
    cls = Qwen2ForCausalLM if family == "qwen2" else LlamaForCausalLM
    # built directly in the checkpoint's dtype: a 1-layer Qwen2-7B is 1.1 G parameters, 4.4 GB in float32
    model = cls(cfg) if dtype is None else cls._from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _write_whisper(folder, sizes=TINY_WHISPER):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    cfg = WhisperConfig(**sizes)
    WhisperModel(cfg).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(folder)


def _write_all(paths, writers, seed, stamps=None):
    """Run writers[name](paths[name]) for every checkpoint not yet complete. Each one ends by writing
    path + ".done" holding stamps[name] (what was written; "" for the tiny ones), so an interrupted write, or a
    folder written with other sizes, is redone."""
    for name, path in paths.items():
        done, stamp = path + ".done", (stamps or {}).get(name, "")
        if os.path.exists(done):
            with open(done) as f:
                if f.read() == stamp:
                    continue
        os.makedirs(os.path.dirname(path) if name == "beats" else path, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            writers[name](path)
        with open(done, "w") as f:
            f.write(stamp)
    return paths


def _check_transformers():
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError("tiny.py builds its tokenizers with the transformers 5 tokenizer classes "
                           f"(Qwen2Tokenizer(vocab=, merges=)); found transformers {transformers.__version__}")


def write_tiny_checkpoints(folder, llm="qwen2", seed=0):
    """Write (or reuse) tiny Whisper, BEATs and `llm` ("qwen2" | "llama") checkpoints under `folder`.

    Returns dict(whisper=<dir>, beats=<.pt file>, llm=<dir>)."""
    _check_transformers()
    if llm not in ("qwen2", "llama"):
        raise ValueError(f"write_tiny_checkpoints: llm must be 'qwen2' or 'llama', got {llm!r}")
    import beats  # imported here: only needed when the BEATs checkpoint is written
    paths = dict(whisper=os.path.join(folder, "whisper"),
                 beats=os.path.join(folder, "beats", beats.BEATS_CKPT_NAME),
                 llm=os.path.join(folder, llm))
    writers = dict(whisper=_write_whisper, beats=beats.write_tiny_beats, llm=lambda p: _write_llm(p, llm))
    return _write_all(paths, writers, seed)


def _real_layers(layers):
    """layers (None | int | {"whisper", "beats", "llm"} -> int) -> {component: int or None}."""
    parts = ("whisper", "beats", "llm")
    if layers is None or isinstance(layers, int):
        return dict.fromkeys(parts, layers)
    if not isinstance(layers, dict) or set(layers) - set(parts):
        raise ValueError(f"layers must be None, an int or a dict with keys {list(parts)}, got {layers!r}")
    return {p: layers.get(p) for p in parts}


def write_real_checkpoints(folder, llm="qwen2-7b", layers=None, seed=0):
    """Write (or reuse) Whisper-large-v2, BEATs cpt2 and `llm` ("qwen2-7b" | "vicuna-13b") at the real widths with
    random weights, in the formats of write_tiny_checkpoints, under folder/{whisper-large-v2, beats-cpt2, llm}.
    `layers`: None (real depths), an int (every component) or {"whisper": n, "beats": n, "llm": n}.

    Returns dict(whisper=<dir>, beats=<.pt file>, llm=<dir>)."""
    _check_transformers()
    if llm not in REAL_LLMS:
        raise ValueError(f"write_real_checkpoints: llm must be one of {list(REAL_LLMS)}, got {llm!r}")
    import beats
    depth = _real_layers(layers)
    sizes = dict(whisper=_real("whisper-large-v2", depth["whisper"]), beats=real_beats_cfg(depth["beats"]),
                 llm=_real(llm, depth["llm"]))
    family, dtype = REAL_CONFIGS[llm]["family"], getattr(torch, REAL_CONFIGS[llm]["dtype"])
    paths = dict(whisper=os.path.join(folder, "whisper-large-v2"),
                 beats=os.path.join(folder, "beats-cpt2", beats.BEATS_CKPT_NAME),
                 llm=os.path.join(folder, llm))
    writers = dict(whisper=lambda p: _write_whisper(p, sizes["whisper"]),
                   beats=lambda p: beats.write_tiny_beats(p, seed=seed, **sizes["beats"]),
                   llm=lambda p: _write_llm(p, family, sizes["llm"], dtype))
    return _write_all(paths, writers, seed, {k: json.dumps(v, sort_keys=True) for k, v in sizes.items()})


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--llm", choices=["qwen2", "llama", *REAL_LLMS], default="qwen2",
                   help="qwen2 | llama: tiny checkpoints; qwen2-7b | vicuna-13b: the real widths (default: qwen2)")
    p.add_argument("--layers", type=int, default=None,
                   help="real widths only: layers of every component (default: the real depths, 15-26 GB)")
    a = p.parse_args()
    if a.llm in REAL_LLMS:
        print(json.dumps(write_real_checkpoints(a.folder, a.llm, a.layers), indent=1))
    elif a.layers is not None:
        p.error("--layers applies to the real widths (--llm qwen2-7b | vicuna-13b)")
    else:
        print(json.dumps(write_tiny_checkpoints(a.folder, a.llm), indent=1))
