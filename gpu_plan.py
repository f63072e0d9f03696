"""Plan GPU-days before spending them: parameters, memory and time of a training step and of decoding.

    python gpu_plan.py --real qwen2-7b --per-device-batch-size 4 --align ot --layers 0 1
    python gpu_plan.py --real vicuna-13b --align ctc --gradient-checkpointing --no-measure
    python gpu_plan.py --whisper openai/whisper-large-v2 --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt \\
        --llm Qwen/Qwen2-7B --per-device-batch-size 8 --measure-layers 0     # on a GPU: measure at full depth

It takes the model and batch flags of the stage scripts (config.add_model_args, train.add_train_args) and reads
top to bottom:

1. Count. The LSM and the stage's objective are built by the stage scripts' own code (model.LSM,
   train.Objective for stage 1 / --align none, joint_train.AlignedObjective for stage 3), but every backbone from its
   config on the meta device (RandomBackbones): no weight is read or allocated, so full depth costs nothing.
   --real NAME takes the configs of tiny.REAL_CONFIGS (Whisper-large-v2, BEATs cpt2, Qwen2-7B | Vicuna-13B v1.1);
   otherwise --whisper / --beats / --llm are read as usual but only their config.json, tokenizer and BEATs cfg are
   used.

2. Bytes, per part (whisper, beats, ln, qformer, proj, lora, llm, ctc_head), in each parameter's dtype:
     frozen weights, trainable weights, gradients (= trainable parameters, same dtype),
     AdamW state = exp_avg + exp_avg_sq: 2 tensors of the parameter's dtype (fp32) per trainable parameter,
     the gradient all-reduce buffer when --processes > 1: runtime.sync_gradients flattens at most
     runtime.GRAD_BUCKET = 2^25 values at a time, so min(gradients, 128 MiB) (a total, not per part).
   These are exact and device-independent.

3. Activation model. What a step needs on top of the weights, gradients and AdamW state -- the tensors saved
   for backward and the transient workspace -- grows
     * linearly with the per-device batch B (every sample has its own activations),
     * linearly with the number of LLM layers L that are back-propagated through (LoRA is in every layer and
       the speech tokens need their gradient, so every decoder layer keeps its activations; with
       --gradient-checkpointing only its input, B x S x d, plus one layer recomputed at a time),
     * linearly with the sequence length S = prompt + 88 speech tokens + target (SDPA attention keeps O(S)
       per head, not the S x S matrix; the LM head runs only at the target positions),
     * not with the depth of the frozen encoders (they run without gradient: one layer's tensors at a time).
   So  A(B, L) = w + B (u + v L), fitted by least squares to steps measured at the real widths with
   --measure-layers decoder layers (B = 1 and B = 2; the encoders at one layer), leaving out the deepest
   B = 1 point, which the fit must predict (printed with its error). Decoding: the encoders' peak, and the
   generation's peak G(L) = w' + v' L likewise; the KV cache is also computed exactly:
   2 (K, V) x L x kv_heads x head_dim x bytes x B x beams x (S + new).

4. Measure, unless --no-measure: a few optimiser steps on the current device (train.train_step, the training
   loop's own step) and one decode (beam --num-beams, exactly --max-new-tokens new tokens, KV cache on), with
   random weights at the real widths built in memory from the configs. Memory: on a GPU the peak of
   torch.cuda.max_memory_allocated above the weights; on the CPU the peak of the bytes of every tensor alive
   (tracked through a TorchDispatchMode: what max_memory_allocated counts, without allocator rounding), and
   the peak RSS growth of the process as a check. Step 1 allocates the AdamW state, step 2 is measured (memory,
   FLOPs: torch.utils.flop_counter, i.e. matrix products, convolutions, attention; exactly linear in depth),
   steps 3.. are timed. On the CPU, random weights at one encoder layer and 1-4 LLM layers take ~30 s to build
   and ~10-20 s per step, and a decode (8 clips x 4 beams x 200 tokens) several minutes: --no-decode skips it.

The last line of stdout is one JSON object with every number (keys: JSON_KEYS).
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import weakref

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import beats as beats_lib
import config
import joint_train
import model
import tiny
import runtime
import train

JSON_KEYS = ("model", "layout", "parts", "totals", "measured", "fit", "decode", "predicted")
GiB = 2 ** 30
CARDS_GB = (24, 40, 80, 141)  # common GPU memory sizes (GB as sold, taken as GiB here: a margin of ~7%)
USABLE = 0.9  # of a card's memory for tensors: the rest is CUDA context, allocator fragmentation, NCCL buffers
PARTS = ("whisper", "beats", "ln", "qformer", "proj", "lora", "llm", "ctc_head")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runtime.HelpFormatter)
    g = p.add_argument_group("plan")
    g.add_argument("--real", choices=tiny.REAL_LLMS, default=None,
                   help="the paper's backbones at the real widths (tiny.REAL_CONFIGS) instead of --whisper/--beats/--llm")
    g.add_argument("--align", default="none", choices=["none", "ot", "ctc", "cl"],
                   help="none: stage 1 (and stage 3 base); ot / ctc / cl: stage 3 as joint_train.py")
    g.add_argument("--layers", type=runtime.COUNT, nargs="+", default=[0, 1], help="layers of --align ot (paper, Qwen2: 0 1)")
    g.add_argument("--processes", type=runtime.POSITIVE_INT, default=8, help="processes (GPUs) of the planned run: all-reduce buffer, time")
    g.add_argument("--audio-seconds", type=runtime.Range(float, ge=1, le=30), default=30.0, help="clip length of the measured batches (30 = max)")
    g.add_argument("--target-tokens", type=runtime.POSITIVE_INT, default=64, help="target (and transcript) tokens per sample")
    g.add_argument("--no-measure", action="store_true", help="counts and bytes only (no step is run)")
    g.add_argument("--measure-layers", type=runtime.COUNT, nargs="+", default=[1, 2, 4],
                   help="LLM depths of the measured steps (0 = full depth); the deepest is the held-out point")
    g.add_argument("--steps", type=runtime.POSITIVE_INT, default=3,
                   help="optimiser steps per measurement: 1 warm-up (AdamW state), 1 measured, the rest timed "
                        "(at least 2 run)")
    g.add_argument("--no-decode", action="store_true", help="measure training steps only")
    g.add_argument("--num-beams", type=runtime.POSITIVE_INT, default=4, help="decoding: beam size (evaluate.py default)")
    g.add_argument("--max-new-tokens", type=runtime.POSITIVE_INT, default=200, help="decoding: new tokens (all of them are generated)")
    g.add_argument("--decode-batch-size", type=runtime.POSITIVE_INT, default=8, help="decoding: utterances per batch and GPU")
    config.add_model_args(p)
    train.add_train_args(p, warmup_steps=3000, max_steps=80000)
    for action in p._actions:  # a plan writes nothing
        if action.dest == "output_dir":
            action.required, action.default, action.help = False, None, "unused by gpu_plan.py"
    return p


# ----------------------------------------------------------------------------- 1. count


def with_depth(hf_config, n, keys):
    """A transformers config with its depth (the entries `keys`) set to n (None: unchanged)."""
    if n is None:
        return hf_config
    d = hf_config.to_dict()
    d.update({k: n for k in keys})
    if d.get("layer_types"):
        d["layer_types"] = d["layer_types"][:n]
    return type(hf_config).from_dict(d)


class RandomBackbones:
    """model.LSM's frozen backbones built from their configs alone (config.json, the BEATs checkpoint's cfg), with
    each model's own random initialisation, directly on the device LSM gives ("meta": nothing allocated), with the
    depth of component c set to layers[c] (c in whisper, beats, llm). No weight file is read."""

    def __init__(self, layers=None):
        self.layers = layers or {}

    def whisper(self, cfg, device):
        whisper = with_depth(AutoConfig.from_pretrained(cfg.whisper), self.layers.get("whisper"),
                             ("encoder_layers", "decoder_layers"))
        with torch.device(device):
            return model.WhisperEncoderOnly._from_config(whisper, dtype=torch.float32)

    def beats(self, cfg, device):
        if not os.path.isfile(cfg.beats):
            raise FileNotFoundError(f"BEATs checkpoint not found: {cfg.beats}")
        saved = torch.load(cfg.beats, map_location="cpu", weights_only=True, mmap=True)  # mmap: the cfg only is read
        beats_cfg = dict(saved["cfg"])
        if self.layers.get("beats") is not None:
            beats_cfg["encoder_layers"] = self.layers["beats"]
        with torch.device(device):
            return beats_lib.BEATs(beats_cfg).requires_grad_(False).eval()

    def llm(self, cfg, device):
        llm = with_depth(AutoConfig.from_pretrained(cfg.llm), self.layers.get("llm"), ("num_hidden_layers",))
        with torch.device(device):
            return AutoModelForCausalLM.from_config(llm, dtype=config.DTYPES[cfg.llm_dtype])


def real_config_folder(name, folder):
    """Config-only folders of the real backbones (no weights): whisper/, beats.pt ({cfg}), llm/ (tiny tokenizer)."""
    from transformers import WhisperFeatureExtractor
    paths = dict(whisper=os.path.join(folder, "whisper"), beats=os.path.join(folder, beats_lib.BEATS_CKPT_NAME),
                 llm=os.path.join(folder, name))
    tiny.real_whisper_config().save_pretrained(paths["whisper"])
    WhisperFeatureExtractor(feature_size=80).save_pretrained(paths["whisper"])
    torch.save({"cfg": tiny.real_beats_cfg(), "model": {}, "label_dict": {}}, paths["beats"])
    family = tiny.REAL_CONFIGS[name]["family"]
    tok = tiny.tiny_qwen2_tokenizer() if family == "qwen2" else tiny.tiny_llama_tokenizer()
    tok.save_pretrained(paths["llm"])
    tiny._llm_config(family, tiny.REAL_CONFIGS[name]["config"], tok).save_pretrained(paths["llm"])
    return paths


def build(args, device, layers=None):
    """The stage's objective (train.Objective or joint_train.AlignedObjective around model.LSM) on `device`."""
    with torch.device(device):
        torch.manual_seed(args.seed)
        lsm = model.LSM.from_args(args, device=device, backbones=RandomBackbones(layers), verbose=False)
        if args.align == "none":
            return train.Objective(lsm)
        layers_ot = [l for l in args.layers if l <= lsm.n_layers]  # a shallow measured model has fewer layers
        return joint_train.AlignedObjective(lsm, args.align, layers_ot or [0])


def part_of(name):
    """Parameter name of the objective -> its part (PARTS)."""
    if "lora_" in name:
        return "lora"
    if name.startswith("ctc_head."):
        return "ctc_head"
    top = name.split(".")[1]  # lsm.<top>...
    return {"ln_whisper": "ln", "ln_beats": "ln", "query": "qformer"}.get(top, top)


def count(objective):
    """-> {part: dict(params, trainable, frozen_bytes, trainable_bytes, grad_bytes, adam_bytes)}; the all-reduce
    buffer of several processes is a total (totals)."""
    parts = {}
    for name, p in objective.named_parameters():
        row = parts.setdefault(part_of(name), dict.fromkeys(
            ("params", "trainable", "frozen_bytes", "trainable_bytes", "grad_bytes", "adam_bytes"), 0))
        n, size = p.numel(), p.element_size()
        row["params"] += n
        if p.requires_grad:
            row["trainable"] += n
            row["trainable_bytes"] += n * size
            row["grad_bytes"] += n * size  # .grad has the parameter's dtype
            row["adam_bytes"] += 2 * n * size  # exp_avg, exp_avg_sq (torch.optim.AdamW: zeros_like(param))
        else:
            row["frozen_bytes"] += n * size
    return {k: parts[k] for k in PARTS if k in parts}


def totals(parts, processes=1):
    """Sums over the parts, plus sync_bytes (the gradient all-reduce's flat buffer, runtime.sync_gradients: at most
    runtime.GRAD_BUCKET fp32 values at once, none for one process) and static_bytes (everything but activations)."""
    t = {k: sum(r[k] for r in parts.values()) for k in next(iter(parts.values()))}
    t["sync_bytes"] = min(t["grad_bytes"], 4 * runtime.GRAD_BUCKET) if processes > 1 else 0
    t["static_bytes"] = sum(t[k] for k in ("frozen_bytes", "trainable_bytes", "grad_bytes", "adam_bytes", "sync_bytes"))
    return t


# ----------------------------------------------------------------------------- 4. measure (3. is the fit below)


class LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode that are still alive, and their peak: on the CPU
    what torch.cuda.max_memory_allocated counts on a GPU (without the caching allocator's rounding)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        self.peak_backward = self.peak_forward = 0  # inside the autograd engine's backward / everywhere else

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self.live and key not in inputs:  # views and in-place results are no new memory
                    self.live[key] = s.nbytes()
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                    if torch._C._current_autograd_node() is not None:
                        self.peak_backward = max(self.peak_backward, self.now)
                    else:
                        self.peak_forward = max(self.peak_forward, self.now)
                    weakref.finalize(s, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)


def rss():
    """(current, peak) resident set size of this process in bytes (Linux /proc; (0, 0) elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            v = dict(line.split(":", 1) for line in f)
        return int(v["VmRSS"].split()[0]) * 1024, int(v["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        return 0, 0


def reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


@contextlib.contextmanager
def peak_memory(device):
    """-> dict filled on exit: peak_bytes (above what was allocated on entry), rss_growth_bytes (CPU)."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        out.update(peak_bytes=peak, peak_backward_bytes=peak, peak_forward_bytes=0,
                   method="torch.cuda.max_memory_allocated (not split by phase)")
        return
    reset_rss_peak()
    rss0 = rss()[0]
    with LiveTensors() as live:
        yield out
    out.update(peak_bytes=live.peak, peak_backward_bytes=live.peak_backward, peak_forward_bytes=live.peak_forward,
               rss_growth_bytes=max(0, rss()[1] - rss0),
               method="peak bytes of live tensors (TorchDispatchMode), forward and backward; RSS growth as a check")


def text_of_tokens(tokenizer, n):
    """A text of about n tokens of this tokenizer."""
    ids = tokenizer(" ".join(["the quick brown fox jumps over the lazy dog"] * n), add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:n])


def make_batch(lsm, batch_size, seconds, target_tokens, seed=0):
    """A collated batch (data.Collator) of noise clips with targets and transcripts of target_tokens tokens."""
    import data
    from transformers import WhisperFeatureExtractor
    g = torch.Generator().manual_seed(seed)
    fe = WhisperFeatureExtractor(feature_size=lsm.whisper.config.num_mel_bins)
    text = text_of_tokens(lsm.tokenizer, target_tokens)
    items = [dict(id=f"utt{i}", wav=(0.1 * torch.randn(int(seconds * 16000), generator=g)).numpy(),
                  instruction="Translate the speech into Chinese.", target=text, transcript=text, task="st",
                  tgt_lang="zh") for i in range(batch_size)]
    return data.Collator(fe)(items)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_flops(counter, root, *names):
    """FLOPs counted under module `root`.<name> (FlopCounterMode's per-module table)."""
    table = counter.get_flop_counts()
    return sum(sum(table.get(f"{root}.{n}", {}).values()) for n in names)


def measure_step(args, device, layers, batch_size):
    """Build at `layers` on `device` with random weights, run args.steps optimiser steps -> dict."""
    from torch.utils.flop_counter import FlopCounterMode
    objective = build(args, device, layers).to(device).train()
    if args.gradient_checkpointing:
        objective.enable_gradient_checkpointing()
    lsm = objective.lsm
    batch = make_batch(lsm, batch_size, args.audio_seconds, args.target_tokens)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt, _ = train.build_optimizer(objective, args)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    k = args.grad_accum or 1
    micro = [batch] * k  # train.train_step takes the micro-batches of one step
    root = type(objective).__name__
    _sync(device)
    t = time.perf_counter()
    train.train_step(objective, opt, params, micro, 0, args, 0, 1, autocast)  # allocates the AdamW state
    _sync(device)
    first_s = time.perf_counter() - t
    # step 2, steady state: AdamW state exists (static), gradients are set to None at the start of the step
    with peak_memory(device) as mem, FlopCounterMode(display=False) as flops:
        logs = train.train_step(objective, opt, params, micro, 1, args, 0, 1, autocast)
    times = []
    for step in range(2, args.steps):
        _sync(device)
        t = time.perf_counter()
        train.train_step(objective, opt, params, micro, step, args, 0, 1, autocast)
        _sync(device)
        times.append(time.perf_counter() - t)
    static = totals(count(objective))
    seq = lsm.splice(lsm._speech_middles(*[x.detach() for x in _speech_stub(lsm, batch_size)]),
                     batch["instructions"], batch["targets"])["mask"].shape[1]
    # FLOPs of one encoder layer (run once per micro-batch, forward only), to extrapolate to the full depth
    out = dict(llm_layers=lsm.n_layers, batch=batch_size, seq_len=seq, loss=logs["loss"],
               peak_bytes=mem["peak_bytes"], peak_forward_bytes=mem["peak_forward_bytes"],
               peak_backward_bytes=mem["peak_backward_bytes"], rss_growth_bytes=mem.get("rss_growth_bytes"),
               method=mem["method"], grad_bytes=static["grad_bytes"],
               activation_bytes=mem["peak_backward_bytes"] - static["grad_bytes"],
               first_step_s=first_s, step_s=sum(times) / len(times) if times else None,
               flops=flops.get_total_flops() / k,
               whisper_layer_flops=module_flops(flops, root, "lsm.whisper.layers.0") / k,
               whisper_layers=len(lsm.whisper.layers),
               beats_layer_flops=module_flops(flops, root, "lsm.beats.encoder.layers.0") / k if lsm.beats else 0,
               beats_layers=len(lsm.beats.encoder.layers) if lsm.beats else 0)
    return out, objective


def _speech_stub(lsm, batch_size):
    """Zero speech tokens of the right shape (for the sequence length only)."""
    W = model.FRAMES_30S // lsm.window
    return (torch.zeros(batch_size, W, lsm.proj.out_features, device=lsm.device),
            torch.ones(batch_size, W, dtype=torch.bool, device=lsm.device))


def kv_cache_bytes(llm_config, dtype_bytes, batch, beams, tokens):
    """2 (K and V) x layers x kv heads x head dim x bytes x sequences x tokens."""
    c = llm_config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes * batch * beams * tokens


@torch.no_grad()
def measure_decode(args, lsm, device):
    """One batch of --decode-batch-size clips decoded as evaluate.py does (beam search, KV cache) for exactly
    --max-new-tokens new tokens (min_new_tokens: random weights must not stop early) -> dict."""
    import evaluate
    lsm.eval()
    batch = make_batch(lsm, args.decode_batch_size, args.audio_seconds, args.target_tokens)
    cfg = lsm.causal_lm.config
    _sync(device)
    t = time.perf_counter()
    with peak_memory(device) as enc, evaluate.autocast(lsm):  # the encoders' transient: per clip, not per layer
        inp = lsm.splice(lsm._speech_middles(*lsm.encode_speech(batch)), batch["instructions"], left_pad=True)
    # KV cache (per layer) + logits and beam state; the packed LM-head input is what a GPU run's kernels see
    with peak_memory(device) as gen, evaluate.autocast(lsm), model.packed_lm_head(lsm.causal_lm):
        ids = lsm.llm.generate(inputs_embeds=inp["embeds"], attention_mask=inp["mask"],
                               max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                               num_beams=args.num_beams, do_sample=False, eos_token_id=lsm.eos_id,
                               pad_token_id=lsm.pad_id, use_cache=True)
    _sync(device)
    seconds = time.perf_counter() - t
    prompt = inp["mask"].shape[1]
    kv = kv_cache_bytes(cfg, lsm.llm.get_input_embeddings().weight.element_size(), args.decode_batch_size,
                        args.num_beams, prompt + args.max_new_tokens)
    return dict(llm_layers=lsm.n_layers, batch=args.decode_batch_size, beams=args.num_beams, prompt_len=prompt,
                new_tokens=int(ids.shape[1]), peak_bytes=max(enc["peak_bytes"], gen["peak_bytes"]),
                peak_encode_bytes=enc["peak_bytes"], peak_generate_bytes=gen["peak_bytes"],
                rss_growth_bytes=max(enc.get("rss_growth_bytes") or 0, gen.get("rss_growth_bytes") or 0),
                kv_cache_bytes=kv, seconds=seconds)


# ----------------------------------------------------------------------------- 3. the activation model


def fit_activations(points):
    """Least squares A = w + B u + B L v over `points` (dicts with batch, llm_layers, activation_bytes), the
    deepest B = 1 point held out when there are more points than unknowns -> dict(w, u, v, held_out, error).
    Refuses (ValueError) points at a single depth, where v cannot be told apart from u."""
    depths = lambda ps: len({p["llm_layers"] for p in ps})
    if depths(points) < 2:
        raise ValueError(f"the activation fit needs measured steps at 2 or more LLM depths, got only "
                         f"{sorted({p['llm_layers'] for p in points})}: with one depth its per-layer term v takes in "
                         f"the per-sample term u; measure more depths (--measure-layers)")
    ones = [p for p in points if p["batch"] == 1]
    held = max(ones, key=lambda p: p["llm_layers"]) if len(points) > 3 else None
    if held is not None and depths([p for p in points if p is not held]) < 2:
        held = None  # the rest must still span two depths
    use = [p for p in points if p is not held]
    X = torch.tensor([[1.0, p["batch"], p["batch"] * p["llm_layers"]] for p in use], dtype=torch.float64)
    y = torch.tensor([float(p["activation_bytes"]) for p in use], dtype=torch.float64)
    if torch.linalg.matrix_rank(X) < 3:  # e.g. a single batch size: A = w + L v at that batch
        X = X[:, [0, 2]]
        w, v = torch.linalg.lstsq(X, y[:, None]).solution.flatten().tolist()
        coef = dict(w=w, u=0.0, v=v / use[0]["batch"], batch_fixed=use[0]["batch"])
    else:
        w, u, v = torch.linalg.lstsq(X, y[:, None]).solution.flatten().tolist()
        coef = dict(w=w, u=u, v=v)
    predict = lambda B, L: coef["w"] + B * (coef["u"] + coef["v"] * L)
    if held is not None:
        pred = predict(held["batch"], held["llm_layers"])
        coef.update(held_out=dict(batch=held["batch"], llm_layers=held["llm_layers"], measured=held["activation_bytes"],
                                  predicted=pred, rel_error=(pred - held["activation_bytes"]) / held["activation_bytes"]))
    return coef


def fit_linear(xs, ys):
    """Least squares y = a + b x -> (a, b) (b = 0 for a single point)."""
    if len(set(xs)) < 2:
        return float(ys[0]), 0.0
    X = torch.tensor([[1.0, x] for x in xs], dtype=torch.float64)
    a, b = torch.linalg.lstsq(X, torch.tensor(ys, dtype=torch.float64)[:, None]).solution.flatten().tolist()
    return a, b


def cards_that_fit(total_bytes):
    return [gb for gb in CARDS_GB if total_bytes <= USABLE * gb * GiB]


# ----------------------------------------------------------------------------- the plan


def gib(x):
    return "-" if x is None else f"{x / GiB:.2f}"


def print_parts(parts, tot):
    cols = ("params", "trainable", "frozen_bytes", "trainable_bytes", "grad_bytes", "adam_bytes", "sync_bytes")
    print(f"{'part':<9}{'params':>16}{'trainable':>14}" + "".join(f"{c.replace('_bytes', ''):>11}" for c in cols[2:])
          + "   (bytes in GiB)")
    for name, r in list(parts.items()) + [("total", tot)]:
        print(f"{name:<9}{r['params']:>16,}{r['trainable']:>14,}" + "".join(f"{gib(r.get(c)):>11}" for c in cols[2:]))


def run(args, tmp):
    """The plan for parsed flags; `tmp`: a folder for the config-only checkpoints of --real."""
    if args.real:
        args.__dict__.update(real_config_folder(args.real, tmp))
        args.no_beats = False
        names = dict(whisper="whisper-large-v2", beats="beats-cpt2", llm=args.real, real=args.real)
    else:
        names = dict(whisper=args.whisper, beats=None if args.no_beats else args.beats, llm=args.llm, real=None)
    b, k = args.per_device_batch_size or 1, args.grad_accum or 1
    layout = dict(per_device_batch_size=b, grad_accum=k, processes=args.processes, global_batch=b * k * args.processes,
                  gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, llm_dtype=args.llm_dtype,
                  align=args.align, layers=args.layers if args.align == "ot" else None,
                  audio_seconds=args.audio_seconds, target_tokens=args.target_tokens)
    args.per_device_batch_size, args.grad_accum = b, k
    parts, tot, n_layers = count_full_depth(args, names)
    result = dict(model=names, layout=layout, parts=parts, totals=tot, measured=[], fit=None, decode=[], predicted={})
    if not args.no_measure:
        depths = measure(args, result, n_layers)
        fit_and_predict(args, result, tot, n_layers, depths)
    print(json.dumps(result))
    return result


def count_full_depth(args, names):
    """1-2. The parameters and bytes of every part at full depth, on the meta device -> (parts, totals, LLM depth)."""
    full = build(args, "meta")
    parts = count(full)
    tot = totals(parts, args.processes)
    n_layers = full.lsm.n_layers
    print(f"plan: {args.real or args.llm} ({n_layers} LLM layers), {'Whisper + BEATs' if names['beats'] else 'Whisper'}"
          f", --align {args.align}; per device: batch {args.per_device_batch_size} x {args.grad_accum} accumulation, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, autocast {args.dtype}, LLM "
          f"{args.llm_dtype}; {args.processes} processes")
    print_parts(parts, tot)
    print(f"static per GPU (weights + gradients + AdamW + all-reduce buffer): {gib(tot['static_bytes'])} GiB (computed)")
    return parts, tot, n_layers


def measure(args, result, n_layers):
    """4. Training steps (and decodes) measured at reduced depth, the encoders at one layer (their depth does not
    change the activations) -> result["measured"], result["decode"]; returns the measured LLM depths."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = args.per_device_batch_size
    depths = sorted({min(n_layers, d) if d > 0 else n_layers for d in args.measure_layers})
    enc = dict(whisper=1, beats=1) if depths[-1] < n_layers else {}
    points = [(1, d) for d in depths] + ([(2, depths[0])] if len(depths) > 1 else [])
    if b not in (1, 2):
        points.append((b, depths[0]))
    print(f"measuring on {device}: steps at LLM depths {depths} (encoders at {'1 layer' if enc else 'full depth'}), "
          f"batch sizes {sorted({B for B, _ in points})}, {args.steps} step(s) each")
    for B, d in points:
        m, objective = measure_step(args, device, dict(enc, llm=d), B)
        result["measured"].append(m)
        step_s = "-" if m["step_s"] is None else f"{m['step_s']:.2f}"
        print(f"  train  L={d:<3} B={B}: S={m['seq_len']}; above the weights and AdamW state: peak forward "
              f"{gib(m['peak_forward_bytes'])}, backward {gib(m['peak_backward_bytes'])} GiB (activations "
              f"{gib(m['activation_bytes'])} + gradients {gib(m['grad_bytes'])}; RSS growth "
              f"{gib(m['rss_growth_bytes'])}); {m['flops'] / 1e12:.2f} TFLOP per micro-batch, {step_s} s/step")
        if B == 1 and not args.no_decode:
            result["decode"].append(measure_decode(args, objective.lsm, device))
            dm = result["decode"][-1]
            print(f"  decode L={d:<3} B={dm['batch']} x beam {dm['beams']}: prompt {dm['prompt_len']} + "
                  f"{dm['new_tokens']} new tokens, peak {gib(dm['peak_bytes'])} GiB above the weights "
                  f"(KV cache {gib(dm['kv_cache_bytes'])} computed), {dm['seconds']:.1f} s")
        del objective
    return depths


def fit_and_predict(args, result, tot, n_layers, depths):
    """3. The fits of the measured points -> result["fit"], and the predictions at full depth -> result["predicted"],
    both printed."""
    fit = fit_activations(result["measured"])
    one = [m for m in result["measured"] if m["batch"] == 1]
    shallow = [m for m in result["measured"] if m["llm_layers"] == depths[0]]
    result["fit"] = dict(
        activations=fit,
        forward_peak=dict(zip("ab", fit_linear([m["batch"] for m in shallow], [m["peak_forward_bytes"] for m in shallow]))),
        flops_per_sample=dict(zip("ab", fit_linear([m["llm_layers"] for m in one], [m["flops"] / m["batch"] for m in one]))),
        decode_generate_peak=dict(zip("ab", fit_linear([m["llm_layers"] for m in result["decode"]],
                                                       [m["peak_generate_bytes"] for m in result["decode"]])))
        if result["decode"] else None)
    result["predicted"] = p = predict(args, result, tot, n_layers)
    S = one[0]["seq_len"]
    print(f"activation fit A = w + B (u + v L): w {gib(fit['w'])} GiB, u {gib(fit['u'])} GiB, v {gib(fit['v'])} GiB per "
          f"layer and sample (S={S}: {fit['v'] / S / 2**10:.1f} KiB per token and layer)")
    if "held_out" in fit:
        h = fit["held_out"]
        print(f"  held-out L={h['llm_layers']} B={h['batch']}: predicted {gib(h['predicted'])}, measured "
              f"{gib(h['measured'])} GiB ({100 * h['rel_error']:+.1f}%)")
    print(f"predicted per GPU at full depth ({n_layers} LLM layers; GiB; cards that fit at {USABLE:.0%} of "
          f"{'/'.join(map(str, CARDS_GB))} GB):")
    for B, row in p["by_batch"].items():
        print(f"  batch {B}: training {gib(row['train_bytes'])} (fits {row['train_fits_gb'] or 'none'})" +
              (f", decoding beam {args.num_beams} {gib(row['decode_bytes'])} (fits {row['decode_fits_gb'] or 'none'})"
               if row.get("decode_bytes") else ""))
    global_batch = result["layout"]["global_batch"]
    print(f"  {p['train_flops_per_sample'] / 1e12:.2f} TFLOP per training sample, "
          f"{p['train_flops_per_sample'] * global_batch / 1e15:.1f} PFLOP per step of global batch {global_batch}")


def predict(args, result, tot, n_layers, batches=(1, 2, 4, 8)):
    """Full-depth numbers per per-device batch B:
      training = weights + AdamW + all-reduce buffer + max(gradients + A(B, L), forward peak(B))
        (the backward starts with every saved activation alive; the forward peak is the encoders' transient,
        fitted linearly in B at the shallowest depth)
      decoding = weights + max(encoder peak, generate peak G(L)) x B / decode batch (the encoders' transient,
        the KV cache and the logits are all per sequence; G is fitted linearly in L)
      FLOPs per sample = the fit in L + the missing encoder layers (one layer's FLOPs each, forward only)."""
    fit = result["fit"]
    a, f = fit["activations"], fit["forward_peak"]
    weights = tot["frozen_bytes"] + tot["trainable_bytes"]
    m = [x for x in result["measured"] if x["batch"] == 1][0]
    full_enc = _encoder_depths(args)
    enc_extra = (m["whisper_layer_flops"] * (full_enc["whisper"] - m["whisper_layers"])
                 + m["beats_layer_flops"] * (full_enc["beats"] - m["beats_layers"]))
    flops = fit["flops_per_sample"]["a"] + fit["flops_per_sample"]["b"] * n_layers + enc_extra
    out = dict(weights_bytes=weights, train_flops_per_sample=flops, by_batch={})
    for B in sorted({*batches, result["layout"]["per_device_batch_size"]}):
        act = a["w"] + B * (a["u"] + a["v"] * n_layers)
        train_bytes = (weights + tot["adam_bytes"] + tot["sync_bytes"]
                       + max(tot["grad_bytes"] + act, f["a"] + f["b"] * B))
        row = dict(activation_bytes=act, train_bytes=train_bytes, train_fits_gb=cards_that_fit(train_bytes))
        if fit["decode_generate_peak"]:
            d, enc = fit["decode_generate_peak"], result["decode"][0]["peak_encode_bytes"]
            row["decode_bytes"] = weights + max(enc, d["a"] + d["b"] * n_layers) * B / args.decode_batch_size
            row["decode_fits_gb"] = cards_that_fit(row["decode_bytes"])
        out["by_batch"][B] = row
    return out


def _encoder_depths(args):
    """Full encoder depths of the model flags (config only)."""
    from transformers import AutoConfig
    whisper = AutoConfig.from_pretrained(args.whisper).encoder_layers
    nb = 0
    if not args.no_beats:
        nb = torch.load(args.beats, map_location="cpu", weights_only=True, mmap=True)["cfg"].get(
            "encoder_layers", beats_lib.DEFAULTS["encoder_layers"])
    return dict(whisper=whisper, beats=nb)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    runtime.distinct(p, "layers", args.layers)
    runtime.distinct(p, "measure_layers", args.measure_layers)
    if not args.no_measure and len(args.measure_layers) < 2:
        p.error("argument --measure-layers: give at least 2 depths: the activation fit's per-layer term needs steps "
                "at two depths (with one, it takes the per-sample term for a per-layer one)")
    if args.real and any(f in (argv if argv is not None else sys.argv) for f in ("--whisper", "--beats", "--llm")):
        p.error("--real replaces --whisper, --beats and --llm: give one or the other")
    with tempfile.TemporaryDirectory(prefix="gpu_plan_") as tmp:
        return run(args, tmp)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, OSError) as e:  # a missing or wrong checkpoint: one line, no traceback
        sys.exit(f"gpu_plan.py: error: {e}")
