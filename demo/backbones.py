"""Backbones for the CPU demo, built from the toy corpus and saved in the real checkpoint formats.

    python demo/backbones.py --corpus demo_out/corpus --out demo_out/backbones --seed 0

writes (the stage scripts then take --whisper OUT/whisper --beats OUT/beats/<name> --llm OUT/llm, as for the real ones)
    OUT/llm/        Qwen2ForCausalLM + Qwen2 tokenizer (save_pretrained: safetensors, generation_config.json)
    OUT/whisper/    WhisperModel + WhisperFeatureExtractor (80 mel bins, 1500 source positions: 3000-frame, 30 s input)
    OUT/beats/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt   tiny BEATs in the official {cfg, model, label_dict} format
    OUT/backbones.json   sizes, seconds, training losses, the LM's zero-shot MT BLEU, the encoder's CTC error

What each one knows, and why (numbers on the dev split of the default corpus, seed 0, where not said otherwise;
"earlier corpus": the 3000 / 200 / 200 train / dev / test splits the first choices were made on):

Tokenizer: Qwen2's pipeline (NFC, Qwen2's split regex, byte-level BPE), merges learned on text.txt and the prompts;
    1028 tokens. <|endoftext|> is EOS and pad, no BOS, <|im_start|> <|im_end|> <|audio_bos|> <|audio_eos|> special.

LLM: Qwen2 (hidden 128, 4 layers, 4 query / 2 key-value heads, 1.05M parameters) pre-trained on the corpus' text side
    as Qwen2-7B is before stage 1: sequences in the LSM's qwen2 template with the transcript where the speech goes,
        <|audio_bos|>{english}<|audio_eos|>{instruction}{target}<|endoftext|>
    for "Translate the speech into Chinese." / "... Japanese." / "Recognize the speech and give me the
    transcription." (each piece tokenized on its own, as LSM.splice does), plus the text lines as plain LM (a
    quarter of each batch). 600 AdamW steps of 64 sequences: the most that still ends before the Whisper part it
    trains beside (see Cost). Zero-shot text MT, greedy: BLEU 96.1 (zh, tokenize zh) / 99.2 (ja, ja-mecab);
    transcript copy WER 0.6 % (400 steps: 91.0 / 92.3, 6.9 %). LSM.generate(mode="mt", num_beams=1) decodes the same.
    Why 4 layers: 8 (hidden 128, 1.84M parameters) cost 1.8x the time per step (measured in one process) and, at
    400 steps, learn less than 4 (BLEU 80.8 / 80.5, dev loss 0.75 against 0.69); after the demo's stage 1 its
    speech-to-text retrieval (stage 2, 500 candidates, MRR of 64 queries) was at chance level at every layer 0-8
    (0.010-0.026; chance 0.014), where the 4-layer LLM's (100 queries) is 0.107, 0.062, 0.044, 0.024, 0.084 at
    layers 0-4: a deeper toy LLM needs a budget the demo does not have before its layer choice means anything.
    (8 layers of hidden 96, 1.09M parameters: BLEU 58.9 / 69.9.)

Whisper encoder: d_model 96, 2 layers, 4 heads, FFN 384, briefly PRE-TRAINED, because a random one carries too
    little that a connector can use:
      - linear CTC probe of the frozen random encoder (1000 steps, --probe; earlier corpus): dev WER 91 %, CER 78 %;
      - the same encoder after word-level CTC on the 3000 ASR clips (1000 steps of 16, ~95 CPU-s): WER 39 %,
        CER 31 % (earlier corpus: 25 %, 24 %) through the LSM's exact 30 s input (WhisperEncoder.forward on 3000
        padded frames);
      - downstream (earlier corpus), an LSM (Whisper only, Q-Former hidden 128 / 4 heads / FFN 256, LoRA on this LM, float32)
        trained on ASR + ST zh + ST ja of 2000 clips, 1500 steps of 8, AdamW 2e-3, --speech-tokens real, greedy on
        100 dev clips: random encoder ST BLEU 4.7 (zh) / 5.8 (ja), ASR WER 98 % (nearly the same sentence for
        every clip: nothing gets through); CTC encoder ST BLEU 44.5 / 47.1, ASR WER 32 %. (With SALMONN's 88
        speech tokens and lr 1e-3 the CTC encoder was at 20.4 / 26.3 after the same steps, loss still falling.)
    Word units beat characters at this budget (in a 400-step trial: dev WER 78 % with characters, 60 % with words).
    Batches get 0-50 extra padding frames so the encoder learns to ignore padding, as it must behind the 30 s
    input: the WER gap between clips padded to the batch and padded to 30 s is ~4 points.

BEATs: random (beats.write_tiny_beats). It serves the non-speech captions of stage 1 (tones, chirps, noise, whose
    spectra differ grossly); the speech content reaches the LLM through Whisper, so ST does not depend on it.

Cost: the LM and the Whisper encoder train side by side in two processes, one thread each (--jobs 2): tiny
    matrices, so two threads per part lose to thread synchronisation. On two cores: ~115 s from start to end, plus
    ~10 s of imports: the Whisper part ~105 CPU-s (on a quiet machine, earlier corpus: 110 CPU-s, of which mels 8,
    CTC 93, 30 s-input evaluation of 200 clips 9), the LM part (600 steps) ~95 CPU-s (both estimates: measured 179
    and 161 CPU-s on a machine loaded ~5x, where CPU time runs ~1.7x long).
    Downstream, the frozen encoder's 30 s input costs ~0.05 CPU-s per clip (1500 frames of attention), BEATs ~0.002.
Deterministic: the same --seed and --threads give byte-identical weights and tokenizer, whatever --jobs.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import beats as beats_lib  # noqa: E402
import data  # noqa: E402
import tiny  # noqa: E402


def qwen2_template():
    """The LSM's qwen2 template, dict(before=..., after=...{instruction}...): the speech goes between the two.
    Read from config.TEMPLATES so the LM learns exactly the layout the LSM feeds it."""
    from config import TEMPLATES
    return TEMPLATES["qwen2"]


# Text tasks the LM learns, with the transcript where the speech goes: (name, instruction, target field).
MT_TASKS = [("zh", data.instruction("st", "zh"), "zh"),
            ("ja", data.instruction("st", "ja"), "ja"),
            ("asr", data.instruction("asr"), "en")]


# ----------------------------------------------------------------------------- corpus text


def read_pairs(corpus, split):
    """The corpus' parallel sentences of one split -> list of dict(en, zh, ja), in manifest order."""
    by_lang = {}
    for lang in ("zh", "ja"):
        path = os.path.join(corpus, f"st_{lang}_{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is --corpus a folder written by demo/corpus.py?")
        by_lang[lang] = data.read_manifest(path)
    zh, ja = by_lang["zh"], by_lang["ja"]
    if [e["text"] for e in zh] != [e["text"] for e in ja]:
        raise ValueError(f"{corpus}: st_zh_{split}.jsonl and st_ja_{split}.jsonl list different utterances")
    return [dict(en=a["text"], zh=a["translation"], ja=b["translation"]) for a, b in zip(zh, ja)]


def read_text(corpus):
    """Lines of the corpus' text.txt (train-split sentences in en, zh, ja, and the captions)."""
    path = os.path.join(corpus, "text.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is --corpus a folder written by demo/corpus.py?")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size=1024):
    """Qwen2's tokenizer pipeline (NFC, Qwen2's split regex, byte-level BPE) with merges learned on `texts`.

    As Qwen2-7B's: <|endoftext|> is eos = pad (no bos), <|im_start|>, <|im_end|>, <|audio_bos|>, <|audio_eos|>
    are special added tokens. Byte-level: any text round-trips, unseen characters cost one token per byte."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2 import tokenization_qwen2 as tq
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tq.PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tiny.QWEN2_SPECIAL[:1],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = tq.Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tiny.QWEN2_SPECIAL[1:]])
    return tok


def prompt_texts():
    """The prompts the LSM wraps around the speech (qwen2 template, every default instruction)."""
    t = qwen2_template()
    return [t["before"] + t["after"].replace("{instruction}", data.instruction(task, lang))
            for task, lang in [("asr", None), ("aac", None), ("st", "zh"), ("st", "ja")]]


def tokenizer_texts(corpus):
    """What the BPE learns from: text.txt, plus the prompts with the weight of frequent text."""
    return read_text(corpus) + prompt_texts() * 50


# ----------------------------------------------------------------------------- the LM


def template_ids(tok, transcript, instruction, target=None):
    """Token ids of `prefix | transcript | after(instruction) | target EOS`, each piece tokenized on its own,
    exactly as LSM.splice builds them (so the LM sees the token boundaries it will see behind the speech).
    -> (ids, n_prompt) where ids[n_prompt:] is the target and EOS."""
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    t = qwen2_template()
    prompt = ids(t["before"]) + ids(transcript) + ids(t["after"].replace("{instruction}", instruction))
    return prompt + (ids(target) + [tok.eos_token_id] if target is not None else []), len(prompt)


def lm_examples(tok, pairs, lines):
    """Training sequences: every pair in the three template tasks, and every text line as plain LM (+ EOS).
    -> (template examples, plain examples), lists of id lists."""
    templ = [template_ids(tok, p["en"], instr, p[field])[0] for p in pairs for _, instr, field in MT_TASKS]
    plain = [tok(line, add_special_tokens=False).input_ids + [tok.eos_token_id] for line in lines]
    return templ, plain


def new_lm(tok, hidden=128, layers=4, heads=4, kv_heads=2, ffn=None, seed=0):
    """A random Qwen2ForCausalLM sized for the toy corpus (GQA and untied embeddings, as Qwen2-7B)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn or 3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG left alone
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg)


def pad_batch(seqs, pad_id):
    """Right-pad id lists -> input_ids (B, S), attention_mask (B, S), labels (B, S) with -100 at padding."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def lr_at(step, steps, lr, warmup):
    """Linear warm-up to lr, cosine down to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm(lm, tok, templ, plain, *, steps=600, batch=64, lr=3e-3, warmup=40, plain_frac=0.25, seed=0,
             log_every=50):
    """AdamW (weight decay 0.1 on matrices) on the next-token loss of whole sequences; a batch is a
    `plain_frac` share of plain text lines and the rest template examples, drawn with replacement.
    -> list of (step, mean loss over the last log_every steps)."""
    rng = random.Random(f"lm-{seed}")
    decay = [p for p in lm.parameters() if p.dim() >= 2]
    no_decay = [p for p in lm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    lm.train()
    n_plain = round(batch * plain_frac)
    log_every = max(1, min(log_every, steps // 8))
    log, run, t0 = [], [], time.time()
    for step in range(steps):
        seqs = rng.choices(plain, k=n_plain) + rng.choices(templ, k=batch - n_plain)
        ids, mask, labels = pad_batch(seqs, tok.pad_token_id)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append((step + 1, round(sum(run) / len(run), 4)))
            print(f"lm step {step + 1}/{steps} loss {log[-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
            run = []
    lm.eval()
    return log


@torch.no_grad()
def lm_loss(lm, tok, seqs, batch=128):
    """Mean next-token loss (per token) of `seqs` in eval mode."""
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        ids, mask, labels = pad_batch(seqs[i:i + batch], tok.pad_token_id)
        n = int((labels[:, 1:] != -100).sum())
        total += lm(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def translate(lm, tok, sources, instruction, batch=100, max_new_tokens=48):
    """Greedy decoding of the template prompt (transcript in place of the speech), left-padded batches.
    -> list of strings (special tokens dropped, stripped), as LSM.generate(mode="mt", num_beams=1)."""
    lm.eval()
    out = []
    for i in range(0, len(sources), batch):
        prompts = [template_ids(tok, s, instruction)[0] for s in sources[i:i + batch]]
        S = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), S), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, S - len(p):], mask[j, S - len(p):] = torch.tensor(p), 1
        new = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, S:]
        out += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def bleu(hyps, refs, lang):
    """SacreBLEU corpus score -> (score, signature): zh tokenizer for Chinese, ja-mecab (else char) for Japanese."""
    import sacrebleu
    tokenize = {"zh": "zh", "ja": "ja-mecab", "en": "13a"}[lang]
    try:
        metric = sacrebleu.BLEU(tokenize=tokenize)
    except Exception:  # ja-mecab needs mecab-python3 + ipadic (pip install "sacrebleu[ja]")
        metric = sacrebleu.BLEU(tokenize="char")
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def error_rate(hyps, refs):
    """Edit distance / reference length (%) over token sequences (lists of words for WER, of characters for CER)."""
    errors = total = 0
    for h, r in zip(hyps, refs):
        d = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, d[0] = d[0], i
            for j, hw in enumerate(h, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (hw != rw))
        errors, total = errors + d[len(h)], total + len(r)
    return 100.0 * errors / max(1, total)


def wer(hyps, refs):
    return error_rate([h.split() for h in hyps], [r.split() for r in refs])


def cer(hyps, refs):
    return error_rate([list(h) for h in hyps], [list(r) for r in refs])


def evaluate_mt(lm, tok, pairs):
    """Zero-shot text translation of the dev pairs: {zh: BLEU, ja: BLEU, asr: WER (copying the transcript)}."""
    res = {}
    for name, instr, field in MT_TASKS:
        hyps = translate(lm, tok, [p["en"] for p in pairs], instr)
        refs = [p[field] for p in pairs]
        if name == "asr":
            res["asr_copy_wer"] = round(wer(hyps, refs), 2)
        else:
            score, sig = bleu(hyps, refs, name)
            res[f"bleu_{name}"], res[f"bleu_{name}_signature"] = round(score, 2), sig
        res[f"example_{name}"] = [pairs[0]["en"], hyps[0], refs[0]]
    return res


def build_lm(args):
    """Tokenizer + LM: train on the corpus' train split, measure on its dev split, save to OUT/llm -> summary."""
    t0 = time.time()
    train_pairs, dev_pairs = read_pairs(args.corpus, "train"), read_pairs(args.corpus, "dev")
    tok = train_tokenizer(tokenizer_texts(args.corpus), args.vocab_size)
    t_tok = time.time() - t0
    templ, plain = lm_examples(tok, train_pairs, read_text(args.corpus))
    dev_templ, _ = lm_examples(tok, dev_pairs, [])
    lm = new_lm(tok, args.lm_hidden, args.lm_layers, args.lm_heads, args.lm_kv_heads, args.lm_ffn, seed=args.seed)
    loss_init = lm_loss(lm, tok, dev_templ)
    t1 = time.time()
    log = train_lm(lm, tok, templ, plain, steps=args.lm_steps, batch=args.lm_batch, lr=args.lm_lr,
                   warmup=args.lm_warmup, plain_frac=args.lm_plain_frac, seed=args.seed)
    t_train = time.time() - t1
    loss_final = lm_loss(lm, tok, dev_templ)
    t1 = time.time()
    mt = evaluate_mt(lm, tok, dev_pairs[:args.eval_utts])
    t_eval = time.time() - t1
    print(f"lm: dev loss {loss_init:.3f} -> {loss_final:.3f}; zero-shot text MT on {min(len(dev_pairs), args.eval_utts)}"
          f" dev sentences (greedy): BLEU zh {mt['bleu_zh']}, ja {mt['bleu_ja']}; transcript copy WER "
          f"{mt['asr_copy_wer']}", flush=True)
    save_lm(lm, tok, os.path.join(args.out, "llm"))
    return dict(vocab_size=len(tok), params=sum(p.numel() for p in lm.parameters()), hidden=args.lm_hidden,
                layers=args.lm_layers, heads=args.lm_heads, kv_heads=args.lm_kv_heads, steps=args.lm_steps,
                batch=args.lm_batch, train_sequences=dict(template=len(templ), plain=len(plain)),
                dev_loss_init=round(loss_init, 4), dev_loss_final=round(loss_final, 4), train_loss=log, mt_dev=mt,
                seconds=dict(tokenizer=round(t_tok, 1), train=round(t_train, 1), eval=round(t_eval, 1),
                             total=round(time.time() - t0, 1)))


def save_lm(lm, tok, out):
    from transformers import GenerationConfig
    lm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            do_sample=False, max_new_tokens=200)
    lm.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# ----------------------------------------------------------------------------- Whisper encoder


def whisper_config(d_model=96, layers=2, heads=4, ffn=None):
    """Whisper with 80 mel bins and 1500 source positions (large-v2's input: 3000 mel frames = 30 s). The LSM
    uses only the encoder; the 1-layer decoder is there so WhisperModel.from_pretrained loads as for the real one."""
    from transformers import WhisperConfig
    return WhisperConfig(vocab_size=128, num_mel_bins=80, d_model=d_model, encoder_layers=layers,
                         encoder_attention_heads=heads, encoder_ffn_dim=ffn or 4 * d_model, decoder_layers=1,
                         decoder_attention_heads=heads, decoder_ffn_dim=ffn or 4 * d_model,
                         max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])


def load_mels(entries, fe, batch=64):
    """Manifest entries -> list of (80, T_i) log-mels of the frames that see the clip (T_i = samples // 160 + 2).

    The LSM's Collator pads every clip to 30 s; Whisper's normalisation clamps the log-mel at (its max - 8), so
    the padding frames of a clip all equal mel_i.max() - 2 and the real frames do not depend on the padding.
    Keeping only the real frames and padding with that value (pad_mels) rebuilds the exact 30 s input."""
    mels = []
    for i in range(0, len(entries), batch):
        wavs = [data.load_audio(e["audio"])[0] for e in entries[i:i + batch]]
        # 400 zeros (one STFT window) after each clip: the frames that overlap its end then see zeros, as in the
        # 30 s input, and not the reflection padding the extractor puts after the batch's longest clip
        padded = [np.concatenate([w, np.zeros(400, np.float32)]) for w in wavs]
        feats = fe(padded, sampling_rate=data.SAMPLE_RATE, return_tensors="pt", padding="longest").input_features
        mels += [m[:, :len(w) // 160 + 2] for m, w in zip(feats, wavs)]
    return mels


def pad_mels(mels, length=None):
    """list of (80, T_i) -> (B, 80, L) padded with each clip's own padding value (see load_mels);
    L = `length`, or the longest clip rounded up to even (the encoder's stride-2 convolution)."""
    L = length or max(m.shape[1] + m.shape[1] % 2 for m in mels)
    out = torch.stack([m.max() - 2.0 + torch.zeros(m.shape[0], L) for m in mels])
    for i, m in enumerate(mels):
        out[i, :, :m.shape[1]] = m
    return out


def encode(enc, mel):
    """WhisperEncoder on a mel of any even length L <= 3000 -> (B, L // 2, d). Its forward insists on exactly 3000
    frames; this is the same computation (convs, GELU, positions, layers, final norm) on a shorter input."""
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2)
    x = x + enc.embed_positions.weight[:x.shape[1]]
    for layer in enc.layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return enc.layer_norm(x)


class Units:
    """CTC output units: characters ("char") or words ("word") of the training transcripts; 0 is the blank."""

    def __init__(self, texts, unit="word"):
        if unit not in ("char", "word"):
            raise ValueError(f"--ctc-unit must be char or word, not {unit!r}")
        self.unit = unit
        self.units = sorted({u for t in texts for u in self.split(t)})
        self.index = {u: i + 1 for i, u in enumerate(self.units)}

    def split(self, text):
        return list(text) if self.unit == "char" else text.split()

    def __len__(self):
        return len(self.units) + 1

    def ids(self, text):
        return [self.index[u] for u in self.split(text) if u in self.index]

    def greedy(self, logits, n):
        """(T, V) frame logits, n real frames -> text: best path, repeats merged, blanks dropped."""
        best, out, prev = logits[:n].argmax(-1).tolist(), [], 0
        for k in best:
            if k != prev and k != 0:
                out.append(self.units[k - 1])
            prev = k
        return ("" if self.unit == "char" else " ").join(out)


def train_ctc(enc, head, mels, texts, units, *, steps=1000, batch=16, lr=5e-3, warmup=40, extra=(0, 50),
              train_encoder=True, seed=0, log_every=100, tag="ctc"):
    """CTC on the encoder's 50 Hz frames: -log p(units | mel), summed over all alignments of the transcript's
    units (Units: words or characters) to the frames, through a linear head; AdamW, warm-up + cosine.
    Each batch is padded with `extra` (a random number of) padding frames past its longest clip, so the encoder
    learns to ignore padding as it must in the LSM, where every clip is padded to 30 s. With
    train_encoder=False only the linear head learns (a probe of the frozen encoder). -> [(step, mean loss)]."""
    rng = random.Random(f"ctc-{seed}")
    log_every = max(1, min(log_every, steps // 8))
    params = list(head.parameters()) + (list(enc.parameters()) if train_encoder else [])
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    enc.train(train_encoder)
    log, run, t0 = [], [], time.time()
    order = list(range(len(mels)))
    for step in range(steps):
        idx = rng.sample(order, min(batch, len(mels)))
        L = max(mels[i].shape[1] for i in idx) + rng.randint(*extra)
        x = pad_mels([mels[i] for i in idx], L + L % 2)
        with torch.set_grad_enabled(train_encoder):
            h = encode(enc, x)
        logp = head(h).log_softmax(-1).transpose(0, 1)  # (T, B, V)
        targets = [torch.tensor(units.ids(texts[i])) for i in idx]
        in_lens = torch.tensor([(mels[i].shape[1] + 1) // 2 for i in idx])
        loss = F.ctc_loss(logp, torch.cat(targets), in_lens, torch.tensor([len(t) for t in targets]),
                          zero_infinity=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append((step + 1, round(sum(run) / len(run), 4)))
            print(f"{tag} step {step + 1}/{steps} loss {log[-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
            run = []
    enc.eval()
    return log


@torch.no_grad()
def ctc_eval(enc, head, mels, texts, units, full=True, batch=16):
    """Greedy CTC decoding of `mels` -> dict(cer, wer) in %. full=True runs the encoder exactly as the LSM does
    (HF forward on the 30 s padded input), full=False on the clips padded to the batch's longest."""
    enc.eval()
    hyps = []
    for i in range(0, len(mels), batch):
        ms = mels[i:i + batch]
        x = pad_mels(ms, 3000 if full else None)
        h = enc(x).last_hidden_state if full else encode(enc, x)
        logits = head(h)
        hyps += [units.greedy(lg, (m.shape[1] + 1) // 2) for lg, m in zip(logits, ms)]
    return dict(cer=round(cer(hyps, texts), 2), wer=round(wer(hyps, texts), 2), example=[texts[0], hyps[0]])


def build_whisper(args):
    """Whisper encoder: word-level CTC on the corpus' ASR train split (--ctc-steps 0: leave it random), CTC dev
    error through the LSM's exact 30 s input, optional linear probe of the random encoder; save OUT/whisper."""
    from transformers import WhisperFeatureExtractor, WhisperModel
    t0 = time.time()
    fe = WhisperFeatureExtractor(feature_size=80)
    train = data.read_manifest(os.path.join(args.corpus, "asr_train.jsonl"))
    dev = data.read_manifest(os.path.join(args.corpus, "asr_dev.jsonl"))[:args.eval_utts]
    mels, dev_mels = load_mels(train, fe), load_mels(dev, fe)
    texts, dev_texts = [e["text"] for e in train], [e["text"] for e in dev]
    units = Units(texts, args.ctc_unit)
    cfg = whisper_config(args.whisper_dim, args.whisper_layers, args.whisper_heads)
    t_mels = time.time() - t0
    out = dict(d_model=args.whisper_dim, layers=args.whisper_layers, heads=args.whisper_heads, ctc_unit=args.ctc_unit,
               ctc_units=len(units), ctc_steps=args.ctc_steps, ctc_batch=args.ctc_batch, train_utts=len(train),
               eval_utts=len(dev), seconds=dict(mels=round(t_mels, 1)))

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            return WhisperModel(cfg), torch.nn.Linear(args.whisper_dim, len(units))

    if args.probe:  # how much a linear CTC head reads from the frozen random encoder, same budget
        t1 = time.time()
        model, head = fresh()
        out["random_probe_loss"] = train_ctc(model.encoder, head, mels, texts, units, steps=args.ctc_steps,
                                             batch=args.ctc_batch, lr=args.ctc_lr, train_encoder=False,
                                             seed=args.seed, tag="probe")
        out["random_probe_dev"] = ctc_eval(model.encoder, head, dev_mels, dev_texts, units)
        out["seconds"]["probe"] = round(time.time() - t1, 1)
        print(f"whisper: linear CTC probe of the random encoder: dev {out['random_probe_dev']}", flush=True)
    model, head = fresh()
    if args.ctc_steps > 0:
        t1 = time.time()
        out["ctc_loss"] = train_ctc(model.encoder, head, mels, texts, units, steps=args.ctc_steps,
                                    batch=args.ctc_batch, lr=args.ctc_lr, seed=args.seed)
        out["seconds"]["train"] = round(time.time() - t1, 1)
        t1 = time.time()
        out["ctc_dev"] = ctc_eval(model.encoder, head, dev_mels, dev_texts, units)
        out["seconds"]["eval"] = round(time.time() - t1, 1)
        print(f"whisper: CTC head on the trained encoder, 30 s input: dev {out['ctc_dev']}", flush=True)
    folder = os.path.join(args.out, "whisper")
    model.save_pretrained(folder, safe_serialization=True)
    fe.save_pretrained(folder)
    out["params_encoder"] = sum(p.numel() for p in model.encoder.parameters())
    out["seconds"]["total"] = round(time.time() - t0, 1)
    return out


def build_beats(args):
    """BEATs: random (see the module docstring), tiny, in the official checkpoint format."""
    path = os.path.join(args.out, "beats", beats_lib.BEATS_CKPT_NAME)
    beats_lib.write_tiny_beats(path, seed=args.seed)
    model = beats_lib.load_beats(path)
    return dict(random=True, encoder_embed_dim=model.cfg.encoder_embed_dim, layers=model.cfg.encoder_layers,
                params=sum(p.numel() for p in model.parameters()))


PARTS = {"llm": build_lm, "whisper": build_whisper}


def _run_part(name, args):
    """One part in its own process (`--jobs 2`): the LM and the Whisper encoder train at the same time, one thread
    each, which on two cores beats two threads per part one after the other (tiny matrices: thread sync dominates)."""
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    cpu = time.process_time()
    out = PARTS[name](args)
    out["seconds"]["cpu"] = round(time.process_time() - cpu, 1)
    return out


def build(args):
    """Everything, into args.out -> the backbones.json summary."""
    t0 = time.time()
    for name in ("asr_train.jsonl", "asr_dev.jsonl", "st_zh_train.jsonl", "st_zh_dev.jsonl", "text.txt"):
        if not os.path.isfile(os.path.join(args.corpus, name)):
            raise SystemExit(f"--corpus {args.corpus}: {name} not found (build it with demo/corpus.py)")
    os.makedirs(args.out, exist_ok=True)
    summary = dict(seed=args.seed, corpus=os.path.abspath(args.corpus), args=vars(args))
    summary["beats"] = build_beats(args)
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(PARTS)), mp_context=mp.get_context("spawn")) as pool:
            futures = {name: pool.submit(_run_part, name, args) for name in PARTS}
            summary.update({name: f.result() for name, f in futures.items()})
    else:
        for name in PARTS:
            summary[name] = _run_part(name, args)
    summary["paths"] = dict(whisper=os.path.join(args.out, "whisper"), llm=os.path.join(args.out, "llm"),
                            beats=os.path.join(args.out, "beats", beats_lib.BEATS_CKPT_NAME))
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "backbones.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    print(f"backbones in {summary['seconds']:.0f} s -> {args.out}: LM zero-shot MT BLEU (dev) zh "
          f"{summary['llm']['mt_dev']['bleu_zh']} ja {summary['llm']['mt_dev']['bleu_ja']}"
          + (f"; Whisper CTC dev WER {summary['whisper']['ctc_dev']['wer']}" if 'ctc_dev' in summary['whisper'] else ""),
          flush=True)
    return summary


# ----------------------------------------------------------------------------- helpers of demo.sh


def short_whisper(src, dst, corpus):
    """The Whisper checkpoint `src` with an input cut to the corpus' longest clip -> `dst`; -> summary dict.

    A Whisper checkpoint takes a fixed 30 s input (3000 mel frames, WhisperEncoder insists), but the demo's clips are
    under 4 s: at 30 s the frozen encoder, mostly on padding, is ~85% of every training step (measured: a step of 16
    clips 1.2 s -> 0.2 s at 5 s). The same weights with a shorter input: the position embeddings cut to the longest
    clip of every manifest in `corpus` (rounded up to whole seconds, with room for the last 17-frame Q-Former
    window: a partial one is dropped), the feature extractor padding to that length. The real frames' log-mels are
    unchanged (Whisper's normalisation depends on the clip's maximum, not on the padding, see load_mels) and
    build_whisper trains the encoder on batch-padded clips, so only the amount of padding the encoder attends over
    changes. A checkpoint that is already that short is linked as it is. Written to a temporary folder first and
    renamed: an interrupted call leaves no half-written `dst`."""
    import glob
    import shutil
    import soundfile as sf
    from safetensors.torch import load_file, save_file
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} exists (delete it to rebuild it)")
    manifests = [p for p in sorted(glob.glob(os.path.join(corpus, "*.jsonl"))) if not p.endswith("meta.jsonl")]
    if not manifests:
        raise FileNotFoundError(f"--corpus {corpus}: no manifest (*.jsonl) there")
    longest = max(sf.info(e["audio"]).duration for p in manifests for e in data.read_manifest(p))
    seconds = math.ceil(longest + 17 / 50)
    frames = 50 * seconds  # encoder positions, 50 per second (1500 for 30 s)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    out = dict(src=src, dst=dst, longest=round(longest, 3), seconds=seconds, positions=frames)
    if cfg["max_source_positions"] <= frames:  # already short: used as is
        os.symlink(os.path.abspath(src), dst)
        print(f"{src} takes {cfg['max_source_positions'] / 50:g} s: used as is ({dst} links to it)", flush=True)
        return dict(out, seconds=cfg["max_source_positions"] / 50, positions=cfg["max_source_positions"], link=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    w = load_file(os.path.join(src, "model.safetensors"))
    w["encoder.embed_positions.weight"] = w["encoder.embed_positions.weight"][:frames].contiguous()
    save_file(w, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**cfg, "max_source_positions": frames}, f, indent=2)
    with open(os.path.join(src, "preprocessor_config.json")) as f:
        pre = json.load(f)
    pre.update(chunk_length=seconds, n_samples=16000 * seconds, nb_max_frames=100 * seconds)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    os.replace(tmp, dst)
    print(f"longest clip {longest:.2f} s: Whisper input {seconds} s ({frames} positions) in {dst}", flush=True)
    return dict(out, link=False)


def stage2_layers(path, which="selected"):
    """select_layers.py's layers.json -> the layers demo.sh aligns and measures: "selected" (an empty selection
    gives [0], with a note: joint_train.py refuses an empty one and the paper always keeps the embedding layer) or
    "all" (every layer with an MRR: 0 .. L)."""
    with open(path) as f:
        d = json.load(f)
    if which == "all":
        return sorted(int(l) for l in d["mrr"])
    if which != "selected":
        raise ValueError(f"which must be 'selected' or 'all', not {which!r}")
    if not d["selected"]:
        print(f"{path}: no layer above the threshold; aligning layer 0", file=sys.stderr, flush=True)
        return [0]
    return [int(l) for l in d["selected"]]


# ----------------------------------------------------------------------------- CLI


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", default="demo_out/corpus", help="folder written by demo/corpus.py")
    p.add_argument("--out", default="demo_out/backbones", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="every weight and every batch follows from it")
    p.add_argument("--jobs", type=int, default=2, help="processes: 2 trains the LM and Whisper side by side")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / jobs)")
    p.add_argument("--eval-utts", type=int, default=200, help="dev utterances for the MT BLEU and the CTC probe")
    g = p.add_argument_group("tokenizer and LM (Qwen2)")
    g.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (before the 4 added specials)")
    g.add_argument("--lm-hidden", type=int, default=128)
    g.add_argument("--lm-layers", type=int, default=4)
    g.add_argument("--lm-heads", type=int, default=4)
    g.add_argument("--lm-kv-heads", type=int, default=2)
    g.add_argument("--lm-ffn", type=int, default=None, help="MLP width (default 3 x hidden)")
    g.add_argument("--lm-steps", type=int, default=600)
    g.add_argument("--lm-batch", type=int, default=64)
    g.add_argument("--lm-lr", type=float, default=3e-3)
    g.add_argument("--lm-warmup", type=int, default=40)
    g.add_argument("--lm-plain-frac", type=float, default=0.25, help="share of plain text lines in a batch")
    g = p.add_argument_group("Whisper encoder")
    g.add_argument("--whisper-dim", type=int, default=96)
    g.add_argument("--whisper-layers", type=int, default=2)
    g.add_argument("--whisper-heads", type=int, default=4)
    g.add_argument("--ctc-steps", type=int, default=1000, help="CTC pre-training steps (0: random encoder)")
    g.add_argument("--ctc-batch", type=int, default=16)
    g.add_argument("--ctc-lr", type=float, default=5e-3)
    g.add_argument("--ctc-unit", choices=["word", "char"], default="word")
    g.add_argument("--probe", action="store_true",
                   help="also train a linear CTC head on the frozen random encoder (the baseline; costs a second run)")
    g = p.add_argument_group("helpers of demo.sh (instead of building)")
    g.add_argument("--short-whisper", metavar="DST",
                   help="write OUT/whisper with the input cut to the longest clip of --corpus into DST (short_whisper)")
    g.add_argument("--layers", nargs=2, metavar=("LAYERS_JSON", "selected|all"),
                   help="print the selected layers of a layers.json (layer 0 if none) or all its layers, one line")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        if args.layers:
            layers = stage2_layers(*args.layers)
            print(*layers)
            return layers
        if args.short_whisper:
            return short_whisper(os.path.join(args.out, "whisper"), args.short_whisper, args.corpus)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing or malformed input: one line, no traceback
        raise SystemExit(f"backbones.py: error: {type(e).__name__}: {e}") from None
    for flag in ("lm_steps", "ctc_steps", "eval_utts"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(args.threads)
    return build(args)


if __name__ == "__main__":
    main()
