"""BEATs audio encoder (Chen et al. 2022, arXiv:2212.09058) for inference, in plain PyTorch.

SALMONN's second encoder is the "iter3+ AS2M fine-tuned cpt2" checkpoint (BEATS_CKPT_NAME), a torch.load-able dict
{"cfg": dict, "model": state dict, "label_dict": dict}. This port's parameter names are the official ones, so that
state dict loads strictly. Shapes, for B clips of T samples at 16 kHz:

  wav (B,T) -> x 2^15 -> Kaldi fbank (B,F,128), F = 1 + (T - 400) // 160 -> (fbank - 15.41663) / (2 * 6.55582)
  -> Conv2d 16x16 stride 16 -> (B,512,F//16,8) -> tokens (B,N,512), N = 8 * (F//16), time-major: token i is time
     patch i // 8, frequency patch i % 8 (fbank frames past the last whole patch are dropped)
  -> LayerNorm -> Linear(512, 768) -> x + GELU(conv positional embedding) -> LayerNorm (post-LN models)
  -> 12 post-LN layers, deep-norm residual x (2 * 12)^(1/4), gated relative position bias -> (B,N,768)
"""
import argparse
import contextlib
import math
import os
import pickle
import re
import warnings
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

BEATS_CKPT_NAME = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
SAMPLE_RATE, WIN, HOP = 16000, 400, 160  # Kaldi frames: 25 ms window, 10 ms shift at 16 kHz
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # BEATs' AudioSet fbank statistics

# The official BEATsConfig defaults; a checkpoint's cfg overrides them. Dropouts and layer drop are training-only.
DEFAULTS = dict(
    input_patch_size=-1, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0,
    layer_norm_first=False, deep_norm=False, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128, conv_pos_groups=16, relative_position_embedding=False,
    num_buckets=320, max_distance=1280, gru_rel_pos=False, finetuned_model=False, predictor_dropout=0.1,
    predictor_class=527)
# Tiny random model for tests (embed_dim != encoder_embed_dim so post_extract_proj exists, as in the real model).
TINY_CFG = dict(
    input_patch_size=16, embed_dim=24, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True, num_buckets=320,
    max_distance=800, gru_rel_pos=True, deep_norm=True, layer_norm_first=False, finetuned_model=True, predictor_class=5)
ACTIVATIONS = {  # as the official get_activation_fn; its "gelu" runs in float32 whatever the model dtype
    "gelu": lambda x: F.gelu(x.float()).type_as(x), "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu, "tanh": torch.tanh, "linear": lambda x: x}


def kaldi_fbank(wav, sample_rate=SAMPLE_RATE, num_mel_bins=128):
    """Log mel filterbank equal to torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=..., sample_frequency=...)
    with its defaults: 25 ms / 10 ms frames, snip_edges (whole frames only), no dither, per frame remove the DC
    offset, pre-emphasis x[n] - 0.97 x[n-1] (x[-1] := x[0]), povey window hann^0.85, zero-pad to a power of two,
    power spectrum, Kaldi mel filters (20 Hz .. Nyquist), log(max(e, float32 eps)), no energy term.
    wav (..., T) in the caller's scale (Kaldi assumes int16 scale) -> (..., 1 + (T - win) // hop, num_mel_bins)."""
    win, hop = int(sample_rate * 0.025), int(sample_rate * 0.010)
    if wav.shape[-1] < win:
        raise ValueError(f"kaldi_fbank needs at least {win} samples (one 25 ms frame), got {wav.shape[-1]}")
    n_fft = 1 << (win - 1).bit_length()
    x = wav.double() if wav.dtype == torch.float64 else wav.float()
    frames = x.unfold(-1, win, hop)  # (..., F, win)
    frames = frames - frames.mean(-1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    window = torch.hann_window(win, periodic=False, dtype=x.dtype, device=x.device).pow(0.85)
    power = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2)  # (..., F, n_fft // 2 + 1)
    mel = power @ kaldi_mel_banks(num_mel_bins, n_fft, sample_rate).to(power).T
    return mel.clamp_min(torch.finfo(torch.float32).eps).log()


def kaldi_mel_banks(num_bins, n_fft, sample_rate, low_freq=20.0):
    """Kaldi's triangular filters (num_bins, n_fft // 2 + 1) on the mel scale m(f) = 1127 ln(1 + f / 700): filter b
    rises from edge b to b+1 and falls to b+2, edges evenly spaced in mel from low_freq to Nyquist. The Nyquist
    FFT bin gets weight 0, as in Kaldi. Same float32 arithmetic as torchaudio's get_mel_banks."""
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, 0.5 * sample_rate))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    fft_mel = 1127.0 * (1.0 + (sample_rate / n_fft) * torch.arange(n_fft // 2) / 700.0).log()
    up, down = (fft_mel - left) / (center - left), (right - fft_mel) / (right - center)
    return F.pad(torch.minimum(up, down).clamp_min(0.0), (0, 1))


def relative_position_bucket(rel, num_buckets=320, max_distance=800):
    """Bidirectional T5-style bucket of rel = key position - query position (official BEATs / WavLM).
    Each direction gets n = num_buckets // 2 buckets (rel > 0 the upper half). |rel| < n/2 has its own bucket;
    larger |rel| go to n/2 + floor(ln(|rel| / (n/2)) / ln(max_distance / (n/2)) * n/2), capped at n - 1."""
    n = num_buckets // 2
    exact = n // 2
    r = rel.abs()
    log_bucket = exact + (torch.log(r.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                          * (n - exact)).long()  # float32 as the official code, so boundaries round the same way
    return (rel > 0).long() * n + torch.where(r < exact, r, log_bucket.clamp_max(n - 1))


class MultiheadAttention(nn.Module):
    """Self-attention with a relative position bias shared by all layers, scaled per query by a learned gate:
    bias'_hij = (g_a (g_b a_h - 1) + 2) bias_h(j - i), with (g_a, g_b) = sigmoid of sums of 4 of the 8 outputs of
    grep_linear applied to the (unscaled) projected query of head h at position i."""

    def __init__(self, cfg, bias_table):
        super().__init__()
        d, self.num_heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        if bias_table is not None:
            self.relative_attention_bias = bias_table  # layer 0's nn.Embedding, listed under every layer's name
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def forward(self, x, pad=None, pos_bias=None):
        """x (B,N,D), pad (B,N) True = padded key, pos_bias (H,N,N) -> (B,N,D)."""
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B,H,N,d)
        # q.k / sqrt(d) computed as the official code does, ((q / 32 sqrt d).k - row max) * 32, which keeps fp16 finite
        s = (q * (self.head_dim ** -0.5 / 32)) @ k.transpose(-1, -2)
        s = (s - s.amax(-1, keepdim=True)) * 32
        if pad is not None:
            s = s.masked_fill(pad[:, None, None, :], float("-inf"))
        if pos_bias is not None:
            if hasattr(self, "grep_linear"):
                g = torch.sigmoid(self.grep_linear(q).view(B, self.num_heads, N, 2, 4).sum(-1))  # (B,H,N,2)
                pos_bias = (g[..., :1] * (g[..., 1:] * self.grep_a - 1.0) + 2.0) * pos_bias
            s = s + pos_bias
        return self.out_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))


class TransformerSentenceEncoderLayer(nn.Module):
    """Post-LN (the cpt2 model): x = LN(alpha x + Attn(x)); x = LN(alpha x + FFN(x)), alpha = (2 L)^(1/4) with
    deep_norm, else 1. Pre-LN when cfg.layer_norm_first: x = x + Attn(LN(x)); x = x + FFN(LN(x))."""

    def __init__(self, cfg, bias_table):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = MultiheadAttention(cfg, bias_table)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_embed_dim), nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.pre_ln = cfg.layer_norm_first
        self.alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def forward(self, x, pad=None, pos_bias=None):
        ffn = lambda h: self.fc2(self.act(self.fc1(h)))
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), pad, pos_bias)
            return x + ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, pad, pos_bias))
        return self.final_layer_norm(x * self.alpha + ffn(x))


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d under torch.nn.utils.weight_norm(conv, dim=2), kept as its two tensors (the official keys):
    weight[o, i, k] = g[k] v[o, i, k] / ||v[:, :, k]||, one norm per kernel tap; padding k // 2 on both sides."""

    def __init__(self, d, kernel, groups):
        super().__init__()
        v = torch.randn(d, d // groups, kernel) * math.sqrt(4.0 / (kernel * d))  # official init
        self.weight_v, self.weight_g = nn.Parameter(v), nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias, self.groups = nn.Parameter(torch.zeros(d)), groups

    def forward(self, x):
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        b, dtype = self.bias, x.dtype
        # torch 2.13's CPU bf16 grouped conv1d is wrong for some shapes on some CPUs (8 channels per group, kernel
        # 16; pytorch#163347 is of the same kind): on the CPU it runs in float32, also when the input is float32
        # but CPU autocast would cast it to half precision (the default --dtype bfloat16 of the training scripts)
        if x.device.type == "cpu" and (dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
            with torch.autocast("cpu", enabled=False):
                return F.conv1d(x.float(), w.float(), b.float(), padding=w.shape[-1] // 2,
                                groups=self.groups).to(dtype)
        return F.conv1d(x, w, b, padding=w.shape[-1] // 2, groups=self.groups).to(dtype)


class TransformerEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups))  # keys pos_conv.0.*
        self.drop_last = cfg.conv_pos % 2 == 0  # an even kernel with k // 2 padding makes one frame too many
        table = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) if cfg.relative_position_embedding else None
        self.layers = nn.ModuleList(TransformerSentenceEncoderLayer(cfg, table) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.layer_norm_first, self.relative = cfg.layer_norm_first, cfg.relative_position_embedding
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance

    def relative_bias(self, n):
        """bias (H,n,n), bias[h, i, j] = table[bucket(j - i), h] for query i and key j (layer 0's table)."""
        pos = torch.arange(n, device=self.layer_norm.weight.device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.layers[0].self_attn.relative_attention_bias(bucket).permute(2, 0, 1)

    def positional(self, x):
        """x + GELU(conv(x)) over tokens (B,N,D). Padding k // 2 on both sides, and for an even kernel the last output
        dropped (official SamePad), so token m reaches outputs m - k/2 + 1 .. m + k/2."""
        c = self.pos_conv(x.transpose(1, 2))
        return x + F.gelu(c[..., :-1] if self.drop_last else c).transpose(1, 2)

    def forward(self, x, pad=None):
        """x (B,N,D), pad (B,N) True = padding -> (B,N,D). Padded tokens are zeroed so the positional convolution
        sees what a shorter clip's zero padding would give."""
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        x = self.positional(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        pos_bias = self.relative_bias(x.shape[1]) if self.relative else None  # once, for every layer
        for layer in self.layers:
            x = layer(x, pad, pos_bias)
        return self.layer_norm(x) if self.layer_norm_first else x


def make_cfg(cfg):
    """Official defaults updated by a checkpoint's cfg dict (or a namespace) -> SimpleNamespace."""
    cfg = {**DEFAULTS, **(vars(cfg) if isinstance(cfg, SimpleNamespace) else dict(cfg))}
    if cfg["input_patch_size"] <= 0:
        raise ValueError(f"BEATs cfg: input_patch_size must be positive, got {cfg['input_patch_size']}")
    if cfg["activation_fn"] not in ACTIVATIONS:
        raise ValueError(f"BEATs cfg: activation_fn {cfg['activation_fn']!r} not supported ({sorted(ACTIVATIONS)})")
    if cfg["deep_norm"] and cfg["layer_norm_first"]:
        raise ValueError("BEATs cfg: deep_norm and layer_norm_first cannot both be set (as the official code)")
    return SimpleNamespace(**cfg)


class BEATs(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = make_cfg(cfg)
        p, e, d = cfg.input_patch_size, cfg.embed_dim, cfg.encoder_embed_dim
        self.patch_embedding = nn.Conv2d(1, e, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(e)
        self.post_extract_proj = nn.Linear(e, d) if e != d else None
        self.encoder = TransformerEncoder(cfg)
        if cfg.finetuned_model:  # AudioSet classifier of the fine-tuned model: loaded, unused for features
            self.predictor = nn.Linear(d, cfg.predictor_class)
        self.label_dict = {}

    def preprocess(self, wav):
        """wav (B,T) in [-1, 1] -> normalised fbank (B,F,128), float32 whatever the model dtype and any active
        autocast: the power spectra of int16-scaled audio reach 1e8-1e12, past float16's 65504 (the mel product
        `power @ banks.T` is on autocast's half-precision list, and would give inf, then NaN features)."""
        no_autocast = (torch.autocast(wav.device.type, enabled=False) if torch.amp.is_autocast_available(
            wav.device.type) else contextlib.nullcontext())  # the meta device has no autocast
        with no_autocast:
            return (kaldi_fbank(wav * 2 ** 15, SAMPLE_RATE, 128) - FBANK_MEAN) / (2 * FBANK_STD)

    def token_padding_mask(self, padding_mask, n_frames, n_tokens, mode="exact"):
        """Sample mask (B,T) True = pad -> token mask (B,N) True = pad.
        "exact": a token is padding if any sample under its 16-frame time patch is padding, so a padded row gives
        the same features as the row alone. "official": BEATs/SALMONN's forward_padding_mask, which crops and
        reshapes the mask twice (samples -> F frames -> N tokens) as if tokens were a plain time sequence; a
        clip's last, partly padded time patch then stays valid and its features depend on the padding."""
        if mode == "official":
            for n in (n_frames, n_tokens):
                extra = padding_mask.shape[1] % n
                padding_mask = padding_mask[:, :padding_mask.shape[1] - extra]
                padding_mask = padding_mask.view(padding_mask.shape[0], n, -1).all(-1)
            return padding_mask
        if mode != "exact":
            raise ValueError(f"mask_mode must be 'exact' or 'official', got {mode!r}")
        p = self.cfg.input_patch_size
        frame_pad = padding_mask.unfold(1, WIN, HOP).any(-1)[:, :n_frames]  # (B,F) frame touches a padded sample
        n_time = n_frames // p
        patch_pad = frame_pad[:, :n_time * p].reshape(-1, n_time, p).any(-1)  # (B, F // p)
        return patch_pad.repeat_interleave(n_tokens // n_time, dim=1)  # token i -> time patch i // n_freq

    def forward(self, wav, padding_mask=None, mask_mode="exact"):
        """wav (B,T) float in [-1, 1] at 16 kHz, padding_mask (B,T) bool True = pad (or None)
        -> feats (B,N,encoder_embed_dim), padding_mask (B,N) bool True = pad; N = 8 * (F // 16)."""
        min_samples = WIN + (self.cfg.input_patch_size - 1) * HOP  # one whole time patch
        if wav.dim() != 2 or wav.shape[1] < min_samples:
            raise ValueError(f"BEATs expects wav (B,T), T >= {min_samples} samples at 16 kHz; got {tuple(wav.shape)}")
        fbank = self.preprocess(wav)
        x = self.patch_embedding(fbank.unsqueeze(1).to(self.patch_embedding.weight.dtype))  # (B,E,F//p,bins//p)
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # (B,N,E), time-major
        pad = None
        if padding_mask is not None:
            if padding_mask.shape != wav.shape:
                raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != wav shape {tuple(wav.shape)}")
            pad = self.token_padding_mask(padding_mask.to(x.device, torch.bool), fbank.shape[1], x.shape[1], mask_mode)
            empty = pad.all(-1).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"BEATs: rows {empty} have no whole {min_samples}-sample patch of real audio")
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.encoder(x, pad)
        return x, (pad if pad is not None else torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))

    @torch.no_grad()
    def classify(self, wav, padding_mask=None):
        """AudioSet tag probabilities (B, predictor_class) of a fine-tuned checkpoint: sigmoid of the mean token
        logit over real tokens, as the official model. self.label_dict maps an index to its AudioSet label id."""
        if not hasattr(self, "predictor"):
            raise ValueError("classify needs a fine-tuned BEATs checkpoint (cfg finetuned_model), this one has none")
        feats, pad = self(wav, padding_mask)
        logits = self.predictor(feats).masked_fill(pad[..., None], 0.0).sum(1)
        return torch.sigmoid(logits / (~pad).sum(1, keepdim=True))


def load_beats(path, unsafe_load=False):
    """Official BEATs checkpoint -> frozen BEATs in eval mode (strict: every key present, no extra key).

    The file is read with torch.load(weights_only=True), which unpickles tensors and plain containers only. When it
    refuses an object (an unknown class in `cfg` or `label_dict`), the error names what was refused; unsafe_load=True
    (--beats-unsafe-load) then unpickles the whole file (weights_only=False), which runs code from it: only for a
    file you trust. A cfg without "deep_norm" is built as the official BEATsConfig builds it (deep_norm False,
    residual scale 1), with a warning: the cpt2 checkpoint has deep_norm True, and its weights without it give
    features about 20% off."""
    path = os.fspath(path)
    hint = (f"expected {BEATS_CKPT_NAME}: Microsoft's BEATs iter3+ fine-tuned on AS2M (cpt2), the audio encoder of "
            "SALMONN. SALMONN's README links it as 'Fine-tuned BEATs_iter3+ (AS2M) (cpt2)' on the BEATs page of "
            "github.com/microsoft/unilm (beats/README.md); those links expire, so keep your own copy. "
            "Pass its path with --beats, or run without BEATs (--no-beats)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BEATs checkpoint not found: {path} ({hint})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        refused = [] if unsafe_load else _refused(path, e)
        if not refused:
            raise ValueError(f"{path}: cannot be read as a BEATs checkpoint ({type(e).__name__}: {e}); {hint}") from e
        raise ValueError(f"{path}: the safe loader (torch.load weights_only=True) refused these objects: "
                         f"{', '.join(refused)}. If you trust this file, pass --beats-unsafe-load "
                         f"(LSM(beats_unsafe_load=True)) to unpickle it fully; that runs code from the file") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a BEATs checkpoint ({type(e).__name__}: {e}); {hint}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("cfg"), (argparse.Namespace, SimpleNamespace)):
        ckpt["cfg"] = vars(ckpt["cfg"])  # a namespace cfg (possible in a full unpickle) reads like the dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("cfg"), dict) or not isinstance(ckpt.get("model"), dict):
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a BEATs checkpoint (need a dict with 'cfg' and 'model' dicts, found {found}); "
                         + hint)
    if "deep_norm" not in ckpt["cfg"]:
        warnings.warn(f"{path}: its cfg has no 'deep_norm' key; built as the official code builds it "
                      f"(deep_norm=False, residual scale 1). The cpt2 checkpoint has deep_norm=True: with its weights, "
                      f"a model without it gives features about 20% off", stacklevel=2)
    model = BEATs(ckpt["cfg"])
    expected, got = set(model.state_dict()), set(ckpt["model"])
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match its cfg: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}; {hint}")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: {e}") from e
    model.label_dict = dict(ckpt.get("label_dict") or {})
    return model.requires_grad_(False).eval()


def _refused(path, error):
    """The globals torch's safe unpickler refuses in `path` (torch >= 2.5 lists them; else from its message)."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch, or a file the scan cannot read
        names = []
    return names or re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))


def tiny_beats(seed=0, **cfg_overrides):
    """A random tiny BEATs (TINY_CFG updated by cfg_overrides), every parameter moved off its constant init
    (LayerNorm 1/0, grep_a 1, biases 0) so tests see each one. The global RNG state is left untouched."""
    unknown = sorted(set(cfg_overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"tiny BEATs: unknown cfg keys {unknown} (known: {sorted(DEFAULTS)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BEATs({**DEFAULTS, **TINY_CFG, **cfg_overrides})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_tiny_beats(path, *, seed=0, **cfg_overrides):
    """Save tiny_beats(seed, **cfg_overrides) in the official checkpoint format {cfg, model, label_dict}; -> path."""
    model = tiny_beats(seed, **cfg_overrides)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    labels = {i: f"/m/tiny{i}" for i in range(model.cfg.predictor_class)}
    torch.save({"cfg": vars(model.cfg), "model": model.state_dict(), "label_dict": labels}, path)
    return path
