"""The large speech-text model (LSM) of AI-STA: SALMONN's architecture around a Vicuna or Qwen2 LLM.

    mel (B,80,3000) --Whisper encoder (frozen)--> (B,1500,Dw) --LayerNorm--+
    wav (B,T)       --BEATs (frozen)-----------> (B,~1496,Db) --LayerNorm--+--zero-pad, concat--> R (B,1500,Dw+Db)
    R --windows of L=17 frames (stride 17, last 4 frames dropped)--> (B*88, 17, Dw+Db)
      --Q-Former (1 learned query per window, cross-attention to the window)--> (B, 88, 768)
      --Linear(768, d_llm)--> speech tokens E^S (B, 88, d_llm)
    LLM input, per sample (left to right, then right padding; left padding for generation):
      Vicuna:  BOS "USER: <Speech>" E^S "</Speech> {instruction}\\nASSISTANT:" target EOS
      Qwen2:       "<|audio_bos|>"  E^S "<|audio_eos|>{instruction}"              target EOS
    labels are -100 everywhere except target and EOS.

Trainable: the two LayerNorms, the Q-Former and its query, the projector, LoRA (q_proj, v_proj) in the frozen LLM.
Frame rate: Whisper gives 50 frames/s, i.e. one frame per 320 samples at 16 kHz; window k covers frames
[17k, 17k + 17), i.e. samples [17k * 320, (17k + 17) * 320), and is "real" when 17k * 320 < wav_len.

Hidden states (the paper's layers): layer 0 is the LLM's input embedding (for speech: the projector output at
the speech positions; for text: the transcript's token embeddings), layer l >= 1 the output of decoder layer l,
the last one after the final norm (as HF's `output_hidden_states`).

The hyperparameters (sizes, LoRA, template, dtypes) are config.ModelConfig. Not a framework: `LSM` is one nn.Module;
`forward` is `speech_forward` (train.py all-reduces the gradients itself, so any wrapper works; `text_forward` has
no gradient).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import beats as beats_lib
import config
import runtime
from config import DTYPES, TEMPLATE_BY_MODEL_TYPE, TEMPLATES, ModelConfig
from data import UserError

SAMPLE_RATE = 16000
FRAMES_30S = 1500  # Whisper encoder frames for its fixed 30 s input (50 Hz)
SAMPLES_PER_FRAME = SAMPLE_RATE * 30 // FRAMES_30S  # 320
IGNORE = -100  # label of positions without loss


def window_frames(second_per_window=0.333333):
    """Frames per Q-Former window, as SALMONN: round(1500 * 0.333333 / 30) = 17."""
    return round(FRAMES_30S * second_per_window / 30.0)


def real_windows(wav_lens, n_windows, window):
    """(B,) samples -> (B, n_windows) bool: window k overlaps real audio iff k * window * 320 < wav_len."""
    start = torch.arange(n_windows, device=wav_lens.device) * window * SAMPLES_PER_FRAME
    return start[None, :] < wav_lens[:, None]


def rank_device():
    """This process's device, known before any process group exists: cuda:LOCAL_RANK when CUDA is available (torchrun
    sets LOCAL_RANK; 0 without it), else the CPU -- the device train.py and evaluate.py put the model on. It becomes
    the current CUDA device before anything is built: what a library allocates on "cuda" (the CUDA context, RNG
    states, workspaces) lands on this rank's GPU, not on GPU 0."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")

# ----------------------------------------------------------------------------- the frozen backbones


class WhisperEncoderOnly(WhisperEncoder):
    """Whisper's encoder loaded alone from a WhisperModel ("encoder.*") or WhisperForConditionalGeneration
    ("model.encoder.*", openai/whisper-large-v2) checkpoint: the decoder's tensors are never read (large-v2: 2.5 GB
    of encoder instead of 6.2 GB for the whole model in float32, per rank)."""
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\.", r"^proj_out\."]
    KEY_MAPPING = {r"^model\.encoder\.": "", r"^encoder\.": ""}

    @classmethod
    def load(cls, path, device):
        from transformers import AutoConfig
        whisper_config = AutoConfig.from_pretrained(path)
        if whisper_config.model_type != "whisper":
            raise ValueError(f"--whisper {path}: not a Whisper checkpoint (its config is a "
                             f"{whisper_config.model_type!r} one)")
        enc, info = cls.from_pretrained(path, config=whisper_config, key_mapping=cls.KEY_MAPPING,
                                        output_loading_info=True, device_map={"": device}, dtype=torch.float32)
        missing = sorted(info["missing_keys"])
        if missing:  # from_pretrained leaves them randomly initialised (shape mismatches raise in it)
            raise ValueError(f"--whisper {path}: not a Whisper checkpoint with an encoder: {len(missing)} encoder "
                             f"weights missing ({', '.join(missing[:3])}, ...)")
        return enc


class PretrainedBackbones:
    """Where LSM gets its frozen parts: from their checkpoints, tensor by tensor onto `device`, so a GPU rank never
    holds them in host memory. (gpu_plan.py passes a source that builds them from their configs instead.)"""

    @staticmethod
    def whisper(cfg, device):
        return WhisperEncoderOnly.load(cfg.whisper, device)

    @staticmethod
    def beats(cfg, device):
        return beats_lib.load_beats(cfg.beats, unsafe_load=cfg.beats_unsafe_load).to(device)

    @staticmethod
    def llm(cfg, device):
        return AutoModelForCausalLM.from_pretrained(cfg.llm, device_map={"": device}, dtype=DTYPES[cfg.llm_dtype])

# ----------------------------------------------------------------------------- connector


class WindowQFormer(nn.Module):
    """Window-level Q-Former: R (B, T, D) -> (B, T // L, H).

    The frames are cut into W = T // L windows of L frames (stride L; the last T - W*L frames are dropped), the
    windows are batched as (B*W, L, D) and one learned query (init N(0, 0.02)) attends to each through a BERT-style
    Q-Former (self-attention over the query, cross-attention to the window in every layer, FFN)."""

    def __init__(self, enc_dim, window=17, hidden=768, layers=2, heads=12, ffn=3072):
        super().__init__()
        self.window = window
        cfg = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=ffn, encoder_hidden_size=enc_dim, cross_attention_frequency=1)
        self.bert = Blip2QFormerModel(cfg)
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)

    def forward(self, x):
        B, T, D = x.shape
        W, L = T // self.window, self.window
        windows = x[:, :W * L].reshape(B * W, L, D)
        out = self.bert(query_embeds=self.query.expand(B * W, -1, -1), encoder_hidden_states=windows)
        return out.last_hidden_state.reshape(B, W, -1)  # (B*W, 1, H) -> (B, W, H)

# ----------------------------------------------------------------------------- the model


class _StopForward(Exception):
    """Raised by a forward hook on the deepest decoder layer text_forward needs: the layers above it do not run."""


class LSM(nn.Module):
    """Large speech-text model. Build with `LSM.from_args(args)`, `LSM.from_trainable(path)` or
    `LSM(whisper, llm, beats, **options)`, options: the other config.ModelConfig fields."""

    def __init__(self, whisper, llm, beats=None, *, verbose=True, device=None, backbones=PretrainedBackbones,
                 **options):
        """device: where the frozen Whisper encoder and LLM are loaded (default: rank_device()); backbones: where they
        come from (PretrainedBackbones: their checkpoints). Neither is a build argument."""
        super().__init__()
        self.config = cfg = ModelConfig(whisper=whisper, llm=llm, beats=beats, **options)
        self.speech_tokens = cfg.speech_tokens
        device = torch.device(device) if device is not None else rank_device()

        # frozen encoders (float32; under autocast they compute in half precision, except BEATs' fbank)
        self.whisper = backbones.whisper(cfg, device).requires_grad_(False).eval()
        self.beats = backbones.beats(cfg, device) if beats else None  # frozen, eval
        d_whisper = self.whisper.config.d_model
        d_beats = self.beats.cfg.encoder_embed_dim if self.beats is not None else 0

        # trainable connector
        self.ln_whisper = nn.LayerNorm(d_whisper)
        self.ln_beats = nn.LayerNorm(d_beats) if self.beats is not None else None
        self.window = window_frames(cfg.second_per_window)
        self.qformer = WindowQFormer(d_whisper + d_beats, self.window, cfg.qformer_hidden, cfg.qformer_layers,
                                     cfg.qformer_heads, cfg.qformer_ffn)

        # frozen LLM + LoRA
        self.tokenizer = AutoTokenizer.from_pretrained(llm)
        lora_seed = int(torch.randint(2 ** 62, (), device="cpu"))  # LoRA's own seed: one --seed, one model anywhere
        base = backbones.llm(cfg, device).requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):  # what PEFT draws, on the LLM's device, is drawn again below
            self.llm = get_peft_model(base, lora)
        redraw_lora(self.llm, lora_seed)
        self.proj = nn.Linear(cfg.qformer_hidden, base.config.hidden_size)
        self.n_layers = base.config.num_hidden_layers
        self.template_name, self.prefix_ids, self.after, self.eos_id, self.pad_id = prompt_template(
            cfg.template, base.config.model_type, self.tokenizer, llm)
        self.to(device)  # the new modules (connector); the loaded ones are there already
        if verbose and int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per torchrun process
            print(summary(self))

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def build_args(self):
        """The constructor arguments, as saved beside the trainable weights (<path>.json)."""
        return dataclasses.asdict(self.config)

    @property
    def causal_lm(self):
        """The HF *ForCausalLM inside PEFT (LoRA layers injected)."""
        return self.llm.get_base_model()

    @property
    def decoder(self):
        """The HF decoder stack (embed_tokens, layers, norm, rotary_emb) without the LM head."""
        return self.causal_lm.get_decoder()

    @property
    def device(self):
        return self.proj.weight.device

    def train(self, mode=True):
        """Frozen encoders stay in eval mode (no dropout / layer drop); LoRA and the connector follow `mode`."""
        super().train(mode)
        self.whisper.eval()
        if self.beats is not None:
            self.beats.eval()
        return self

    # ------------------------------------------------------------------ speech side

    def encode_speech(self, batch):
        """batch (see data.py) -> speech tokens E^S (B, W, d_llm) float32, speech_mask (B, W) True = real window.

        W = 1500 // 17 = 88 for Whisper's 30 s input. BEATs features at padded positions are set to zero (after the
        LayerNorm), so a clip gives the same tokens alone or in a padded batch."""
        dev = self.device
        # non_blocking: from the DataLoader's pinned memory the copies overlap with the work queued before them
        mel = batch["mel"].to(dev, self.whisper.conv1.weight.dtype, non_blocking=True)
        wav_lens = batch["wav_lens"].to(dev, non_blocking=True)
        with torch.no_grad():
            speech = self.whisper(mel).last_hidden_state  # (B, 1500, Dw)
        x = self.ln_whisper(speech)
        if self.beats is not None:
            wav = batch["wav"].to(dev, torch.float32, non_blocking=True)
            pad = torch.arange(wav.shape[1], device=dev)[None, :] >= wav_lens[:, None]
            with torch.no_grad():
                audio, audio_pad = self.beats(wav, pad)  # (B, N, Db), N ~ 1496 for 30 s
            audio = self.ln_beats(audio).masked_fill(audio_pad[..., None], 0.0)
            n = max(x.shape[1], audio.shape[1])  # zero-pad the shorter stream at the end
            x = torch.cat([F.pad(x, (0, 0, 0, n - x.shape[1])), F.pad(audio, (0, 0, 0, n - audio.shape[1]))], -1)
        tokens = self.proj(self.qformer(x))  # (B, W, d_llm)
        return tokens, real_windows(wav_lens, tokens.shape[1], self.window)

    def _speech_middles(self, tokens, speech_mask):
        """What goes at <Speech> per sample: all W windows (SALMONN) or only the real ones (--speech-tokens real)."""
        if self.speech_tokens == "all":
            return list(tokens)
        return [t[:int(m.sum())] for t, m in zip(tokens, speech_mask)]  # real windows are a prefix

    def _embed_texts(self, texts):
        """Transcripts -> list of (m_i, d_llm) token embeddings (the text that goes where the speech goes)."""
        emb = self.llm.get_input_embeddings()
        out = []
        for i, text in enumerate(texts):
            if text is None:
                raise ValueError(f"sample {i} has no transcript (audio captioning?): the text side needs one")
            out.append(emb(torch.tensor(self._ids(text), dtype=torch.long, device=self.device)))
        return out

    # ------------------------------------------------------------------ prompt splicing

    def splice(self, middles, instructions, targets=None, left_pad=False):
        """Build the LLM input: per sample  prefix | middle_i | after(instruction_i) | target_i EOS, then pad.

        middles: B tensors (n_i, d_llm): speech tokens or transcript embeddings. Returns a dict:
          embeds (B, S, d_llm) in the LLM dtype (zeros at padding); mask (B, S) long, 1 = token;
          position_ids (B, S) = cumsum(mask) - 1 (0 at padding), right for left and right padding alike;
          labels (B, S) (only when targets are given): -100 except target tokens and EOS;
          pos (B, M), pos_mask (B, M): index in the sequence of middle element j of sample i, M = max n_i."""
        if len(instructions) != len(middles) or (targets is not None and len(targets) != len(middles)):
            raise ValueError(f"splice: {len(middles)} middles, {len(instructions)} instructions, "
                             f"{None if targets is None else len(targets)} targets")
        emb = self.llm.get_input_embeddings()
        dev, dtype = self.device, emb.weight.dtype
        rows, label_rows, starts = [], [], []
        for i, mid in enumerate(middles):
            post = self._ids(self.after.replace("{instruction}", instructions[i]))
            tgt = self._ids(targets[i]) + [self.eos_id] if targets is not None else []
            pre_e, post_e, tgt_e = emb(torch.tensor(self.prefix_ids + post + tgt, device=dev)).split(
                [len(self.prefix_ids), len(post), len(tgt)])
            rows.append(torch.cat([pre_e, mid.to(dtype), post_e, tgt_e]))
            label_rows.append([IGNORE] * (len(self.prefix_ids) + len(mid) + len(post)) + tgt)
            starts.append(len(self.prefix_ids))
        B, S, M = len(rows), max(len(r) for r in rows), max(len(m) for m in middles)
        embeds = torch.zeros(B, S, rows[0].shape[-1], dtype=dtype, device=dev)
        mask = torch.zeros(B, S, dtype=torch.long, device=dev)
        labels = torch.full((B, S), IGNORE, dtype=torch.long, device=dev)
        pos = torch.zeros(B, M, dtype=torch.long, device=dev)
        pos_mask = torch.zeros(B, M, dtype=torch.bool, device=dev)
        for i, row in enumerate(rows):
            off = S - len(row) if left_pad else 0
            embeds[i, off:off + len(row)] = row
            mask[i, off:off + len(row)] = 1
            labels[i, off:off + len(row)] = torch.tensor(label_rows[i], device=dev)
            n = len(middles[i])
            pos[i, :n] = off + starts[i] + torch.arange(n, device=dev)
            pos_mask[i, :n] = True
        out = dict(embeds=embeds, mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), pos=pos,
                   pos_mask=pos_mask)
        if targets is not None:
            out["labels"] = labels
        return out

    # ------------------------------------------------------------------ forwards

    def _check_layers(self, layers):
        bad = [l for l in layers if not (isinstance(l, int) and 0 <= l <= self.n_layers)]
        if bad:
            raise UserError(f"layers {bad} out of range: the LLM has layers 0 (embeddings) .. {self.n_layers}")

    def _run_decoder(self, inp, hidden_states):
        return self.decoder(inputs_embeds=inp["embeds"], attention_mask=inp["mask"],
                            position_ids=inp["position_ids"], output_hidden_states=hidden_states, use_cache=False,
                            return_dict=True)

    def forward(self, batch, layers=()):
        return self.speech_forward(batch, layers)

    def speech_forward(self, batch, layers=()):
        """Teacher-forced ST/ASR/AAC step on a collated batch (data.py). Returns a dict:
          loss       mean cross-entropy over all target tokens (+ EOS) of the batch
          n_correct, n_tokens   next-token accuracy counts on the target (SALMONN's validation accuracy)
          hidden     {l: (B, W, d_llm)} LLM states at the speech positions (l = 0: projector output), with gradient
          speech_mask (B, W) True on windows overlapping real audio
          seen_mask  (B, W) True on every speech position the LLM saw (all W with --speech-tokens all; the same as
                     speech_mask with --speech-tokens real)
        W = 88 with --speech-tokens all, the batch's largest number of real windows with --speech-tokens real."""
        layers = tuple(layers)
        self._check_layers(layers)
        tokens, speech_mask = self.encode_speech(batch)
        inp = self.splice(self._speech_middles(tokens, speech_mask), batch["instructions"], batch["targets"])
        out = self._run_decoder(inp, hidden_states=bool(layers))
        # logits only where a target token is predicted (a 152k vocabulary x every position would dominate memory)
        labels = inp["labels"][:, 1:]
        sel = labels != IGNORE
        logits = self.causal_lm.get_output_embeddings()(out.last_hidden_state[:, :-1][sel]).float()
        target = labels[sel]
        loss = F.cross_entropy(logits, target)
        hidden = {l: at_positions(out.hidden_states[l], inp["pos"], inp["pos_mask"]) for l in layers}
        return dict(loss=loss, n_correct=(logits.argmax(-1) == target).sum(), n_tokens=sel.sum(), hidden=hidden,
                    speech_mask=speech_mask[:, :inp["pos"].shape[1]], seen_mask=inp["pos_mask"])

    @torch.no_grad()
    def text_forward(self, transcripts, instructions, layers):
        """The transcripts in place of the speech (same template and instruction, no target), in eval mode.

        Returns ({l: (B, m, d_llm)} states at the transcript positions, text_mask (B, m) True = token).
        Runs only decoder layers 1 .. max(layers) (see _decoder_states)."""
        layers = tuple(layers)
        self._check_layers(layers)
        if not layers:
            raise ValueError("text_forward: give at least one layer")
        with eval_mode(self):
            inp = self.splice(self._embed_texts(transcripts), instructions)
            states = {0: inp["embeds"]}
            if max(layers) > 0:
                states.update(self._decoder_states(inp, max(layers)))
            hidden = {l: at_positions(states[l], inp["pos"], inp["pos_mask"]) for l in layers}
        return hidden, inp["pos_mask"]

    def _decoder_states(self, inp, n):
        """{l: hidden state l (B, S, d)} for l = 1..n, running decoder layers 1..n only.

        The model is left as it is (no layer list cut, no config change): forward hooks on layers 1..n record
        their outputs, and for n < L the hook on layer n raises _StopForward, so the layers above it and the final
        norm never run (hidden state n is then the raw output of layer n, as in a full forward). For n = L, state L
        is the decoder's output after the final norm, as HF's hidden_states[L]. The decoder is called without
        output_hidden_states, so transformers' own capture machinery (installed on the layers present at the first
        call that asks for hidden states) is not involved, and no call order can change what a later forward
        returns. HF's rotary embeddings, causal mask and padding handling apply unchanged."""
        dec, L, states = self.decoder, self.n_layers, {}

        def hook(l):
            def record(module, args, output):
                states[l] = output[0] if isinstance(output, (tuple, list)) else output
                if l == n < L:
                    raise _StopForward
            return record
        handles = [dec.layers[l - 1].register_forward_hook(hook(l)) for l in range(1, n + 1)]
        try:
            states[L] = self._run_decoder(inp, hidden_states=False).last_hidden_state
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return states

    @torch.no_grad()
    def generate_ids(self, batch, mode="st", num_beams=4, max_new_tokens=200):
        """Decode from speech (mode "st") or from the transcript in place of the speech (mode "mt", the paper's
        zero-shot MT). Left-padded prompts, greedy if num_beams == 1 else beam search, stop at the template's EOS.
        Returns the new token ids (B, n <= max_new_tokens), padded with the pad id after EOS."""
        with eval_mode(self):
            if mode == "st":
                middles = self._speech_middles(*self.encode_speech(batch))
            elif mode == "mt":
                middles = self._embed_texts(batch["transcripts"])
            else:
                raise ValueError(f"generate: mode must be 'st' or 'mt', got {mode!r}")
            inp = self.splice(middles, batch["instructions"], left_pad=True)
            with packed_lm_head(self.causal_lm):
                # every decoding option explicit, so none comes from the checkpoint's generation_config (e.g. sampling)
                return self.llm.generate(inputs_embeds=inp["embeds"], attention_mask=inp["mask"],
                                         max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                         repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
                                         eos_token_id=self.eos_id, pad_token_id=self.pad_id, use_cache=True)

    def generate(self, batch, mode="st", num_beams=4, max_new_tokens=200):
        """-> list of B decoded strings (special tokens skipped, stripped). See generate_ids."""
        ids = self.generate_ids(batch, mode, num_beams, max_new_tokens)
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ trainable state

    def trainable_state(self):
        return trainable_parameters(self)

    def save_trainable(self, path):
        """Trainable parameters -> `path` (safetensors); constructor arguments -> `path` + ".json"."""
        from safetensors.torch import save_file
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable_state().items()}, path)
        with open(path + ".json", "w") as f:
            json.dump(self.build_args, f, indent=1)

    def load_trainable(self, path):
        """Load what save_trainable wrote into this model (every trainable parameter, nothing else)."""
        from safetensors.torch import load_file
        load_trainable_state(self, load_file(path), path, f"was it saved with other model flags? see {path}.json")
        return self

    @classmethod
    def from_trainable(cls, path, **overrides):
        """Rebuild the model from `path`.json (overrides replace entries, e.g. llm=...) and load `path`.
        A missing or unreadable file raises UserError naming it."""
        from safetensors import SafetensorError
        build_args = {**read_build_args(path), **overrides}
        check_backbones(build_args.get("whisper"), build_args.get("llm"))
        lsm = cls(**build_args)
        try:
            return lsm.load_trainable(path)
        except (SafetensorError, OSError) as e:  # a file cut short after its header
            raise UserError(f"{path}: cannot read the trainable weights ({type(e).__name__}: "
                            f"{str(e).strip()[:200]})") from None

    @classmethod
    def from_args(cls, args, **kwargs):
        """The model of the command-line flags (config.add_model_args); kwargs: other constructor arguments (device,
        verbose, backbones)."""
        check_backbones(args.whisper, args.llm)
        return cls(**dataclasses.asdict(ModelConfig.from_args(args)), **kwargs)

# ----------------------------------------------------------------------------- helpers of the model


def prompt_template(template, model_type, tokenizer, llm):
    """--template (auto: the one of the LLM's model_type) -> (name, ids before the speech (BOS if the template has
    one), text after the speech with {instruction}, EOS id, pad id (EOS where the tokenizer has none))."""
    if template == "auto":
        if model_type not in TEMPLATE_BY_MODEL_TYPE:
            raise ValueError(f"--template auto: no template for LLM model_type {model_type!r}; "
                             f"pass --template {'|'.join(TEMPLATES)}")
        template = TEMPLATE_BY_MODEL_TYPE[model_type]
    t = TEMPLATES[template]
    if t["bos"] and tokenizer.bos_token_id is None:
        raise ValueError(f"template {template} needs a BOS token; the tokenizer of {llm} has none")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {llm} has no EOS token")
    prefix = ([tokenizer.bos_token_id] if t["bos"] else []) + tokenizer(t["before"], add_special_tokens=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return template, prefix, t["after"], tokenizer.eos_token_id, pad  # EOS: "<|endoftext|>" Qwen2 base, "</s>" Vicuna


def redraw_lora(module, seed):
    """LoRA's A matrices drawn again on the CPU from `seed`, with PEFT's init (kaiming_uniform_, a = sqrt(5); B stays
    zero). PEFT draws them where the LLM is (from CUDA's generator on a GPU), which would give the same --seed
    another model on a GPU than on the CPU; the draws of PEFT are also kept out of the CPU generator (LSM.__init__)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_A" in name:
                w = torch.empty(p.shape, dtype=p.dtype, device="cpu")  # also inside a torch.device(...) block
                p.copy_(nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g))


def at_positions(h, pos, pos_mask):
    """h (B, S, d), pos (B, M) -> (B, M, d) states at those positions, zero where pos_mask is False."""
    out = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
    return out * pos_mask[..., None].to(out.dtype)


@contextlib.contextmanager
def eval_mode(module):
    """Inside, `module` is in eval mode (no dropout); then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def packed_lm_head(causal_lm):
    """Inside, the LM head gets a packed copy of its input. HF's generation feeds it the slice hidden[:, -1:]; on
    that stride the CPU bf16 linear takes a slow path (Qwen2's 152064 x 3584 head: 18 s and a 2 GB transient per
    call, 0.15 s on a packed copy; with beams it copies the whole head once per token)."""
    hook = causal_lm.get_output_embeddings().register_forward_pre_hook(
        lambda mod, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def summary(lsm):
    """One line: the trainable parameters per part, the template, the speech tokens and the encoders."""
    counts = {}
    for name, p in trainable_parameters(lsm).items():
        part = "lora" if "lora_" in name else name.split(".")[0]
        counts[part] = counts.get(part, 0) + p.numel()
    return (f"LSM: trainable parameters {sum(counts.values()):,} "
            f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}); template {lsm.template_name} "
            f"(speech follows {lsm.tokenizer.convert_ids_to_tokens(lsm.prefix_ids)}), speech tokens "
            f"{lsm.speech_tokens}, {'Whisper + BEATs' if lsm.beats is not None else 'Whisper only'}")


def trainable_parameters(module):
    """{name: parameter} of the parameters that train (requires_grad): what a stage saves and resumes."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module, state, source, hint):
    """Copy state[name] into every trainable parameter of `module`. A name on one side only, or another shape,
    raises UserError naming `source` (the file) with `hint` (why they may differ); nothing is copied then."""
    own = trainable_parameters(module)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{n} has shape {tuple(state[n].shape)}, model has {tuple(p.shape)}" for n, p in own.items()
             if n in state and p.shape != state[n].shape]
    if missing or unexpected or wrong:
        few = lambda names: f"{names[:5]}{'...' if len(names) > 5 else ''}"
        raise UserError(f"{source}: does not match this model's trainable parameters: missing {few(missing)}, "
                        f"unexpected {few(unexpected)}{''.join('; ' + w for w in wrong[:3])} ({hint})")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


def read_build_args(path):
    """The build arguments saved beside the trainable weights `path` (<path>.json), after checking that `path` is a
    readable safetensors file (its header only: a text or truncated file fails here, before minutes of model
    building). Each problem raises UserError naming the file."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (the trainable weights written by a stage's LSM.save_trainable, "
                        f"e.g. runs/stage1/last.safetensors)")
    try:
        with open(path + ".json") as f:
            build_args = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}.json is missing: save_trainable writes the model's build arguments beside "
                        f"{path}; copy both") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}.json: not the JSON save_trainable writes ({e})") from None
    if not isinstance(build_args, dict):
        raise UserError(f"{path}.json: expected a JSON object of build arguments")
    unknown = sorted(set(build_args) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise UserError(f"{path}.json: {unknown} are not build arguments of this model (config.ModelConfig)")
    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).strip()[:200]})") from None
    return build_args


def check_backbones(whisper, llm):
    """A local --whisper / --llm that is not a transformers checkpoint folder fails here, naming the flag
    (transformers would try the hub, or say to install sentencepiece for an empty folder). Hub ids pass."""
    for name, path in (("--whisper", whisper), ("--llm", llm)):
        if not isinstance(path, str):
            continue
        local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
        if local and not os.path.isdir(os.path.expanduser(path)):
            raise UserError(f"{name} {path}: no such folder (give a save_pretrained folder or a hub id)")
        if local and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise UserError(f"{name} {path}: no config.json there, so not a transformers checkpoint folder "
                            f"(save_pretrained writes config.json, the weights and the tokenizer / preprocessor files)")

# ----------------------------------------------------------------------------- what the alignment compares


def alignment_mask(out, positions="real"):
    """The speech positions that carry the alignment (stage-2 retrieval, stage-3 loss, alignment degree, t-SNE), from
    a speech_forward output: "real" (this project's reading of the paper, which does not say) the windows that
    overlap real audio, out["speech_mask"]; "all" every speech position the LLM saw, out["seen_mask"] (SALMONN feeds
    all 88 windows, silence included). Both put uniform mass on the positions they keep. With --speech-tokens real
    the LLM sees only the real windows, so the two are the same. Real windows are a prefix of each row either way."""
    if positions not in config.ALIGN_POSITIONS:
        raise ValueError(f"--align-positions must be one of {config.ALIGN_POSITIONS}, got {positions!r}")
    return out["speech_mask"] if positions == "real" else out["seen_mask"]


def cost_points(x, y, cost="sqeuclidean"):
    """(x, y, factor) such that factor * OT(x', y') with ot.py's squared Euclidean cost is the OT with ground cost
    `cost` between x and y. "sqeuclidean": C_ij = |x_i - y_j|^2 (paper eq. 1): x, y as they are, factor 1.
    "cosine": C_ij = |x_i/|x_i| - y_j/|y_j||^2 / 2 = 1 - cos(x_i, y_j): the L2-normalised states (in float32 at
    least; gradients flow through the normalisation), factor 1/2. The factor may multiply the value instead of the
    cost because ot.py's epsilon is relative to the cost scale (W(c x, c y) = c^2 W(x, y)), so the plan is the same
    either way. The cosine cost ignores the norms, which drift apart between speech and text with depth while the
    directions become similar (beyond the paper)."""
    if cost not in config.OT_COSTS:
        raise ValueError(f"--ot-cost must be one of {config.OT_COSTS}, got {cost!r}")
    if cost == "sqeuclidean":
        return x, y, 1.0
    unit = lambda h: F.normalize(h.to(torch.promote_types(h.dtype, torch.float32)), dim=-1)
    return unit(x), unit(y), 0.5


def masked_mean(h, mask):
    """(B, n, d), (B, n) bool -> (B, d): the mean over the valid positions (a length-averaged representation: the
    contrastive baseline's vectors, Figure 5's points); a row without any valid position gives zeros."""
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


if __name__ == "__main__":
    parser = config.add_model_args(argparse.ArgumentParser(description="Build the LSM and print its trainable "
                                                                       "parameters.",
                                                           formatter_class=runtime.HelpFormatter))
    runtime.cli(lambda: LSM.from_args(parser.parse_args()), "model.py")
