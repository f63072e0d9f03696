#!/usr/bin/env bash
# AI-STA end to end on a CPU in 6-10 minutes (2 cores): a toy spoken En->Zh corpus, tiny backbones that
# know something (an LM that translates text, a CTC-pre-trained Whisper encoder), then the paper's three
# stages and its evaluation, at toy scale. Every command is printed before it runs.
#
#   bash demo.sh                 # -> demo_out/: tables on stdout, figures and every run folder
#   OUT=/tmp/x bash demo.sh      # another output folder
#   bash demo.sh --quick         # (or QUICK=1) fewer utterances and steps: the CI smoke run, ~2 min
#
# Reuse instead of rebuilding (e.g. while experimenting): CORPUS=dir and/or BACKBONES=dir point at the
# outputs of an earlier demo/corpus.py / demo/backbones.py run. A stage whose final output already exists
# in OUT is skipped (delete its folder to redo it), so an interrupted run continues where it stopped.
#
# The hyperparameters below are toy-scale and given explicitly; the scripts' defaults are the paper's.
set -euo pipefail
cd "$(dirname "$0")"

QUICK=${QUICK:-0}
for a in "$@"; do
    case $a in
        --quick) QUICK=1 ;;
        *) echo "usage: [OUT=dir] [QUICK=1] bash demo.sh [--quick]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
OUT=${OUT:-demo_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: checkpoints record the backbone paths they were built from
# One thread per process: two cores shared by the trainer and its data-loader worker (with more threads the
# many tiny ops of these tiny models spin-wait on each other: measured up to 30x slower under contention).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

T0=$SECONDS
TIMES=()
stage() {  # stage NAME: a header; the time of the previous stage is recorded
    _close_stage
    STAGE=$1 STAGE_T0=$SECONDS
    printf '\n========== %s ==========\n' "$1"
}
_close_stage() {
    if [[ -n ${STAGE:-} ]]; then TIMES+=("$(printf '%-34s %4d s' "$STAGE" $((SECONDS - STAGE_T0)))"); fi
}
show() {  # print the exact command (one argument group per line)
    local line="+" a
    for a in "$@"; do
        if [[ $a == --* && ${#line} -gt 2 ]]; then printf '%s \\\n' "$line"; line="   "; fi
        line+=" $(printf '%q' "$a")"
    done
    printf '%s\n' "$line"
}
run() { show "$@"; "$@"; }
done_already() {  # done_already FILE: skip a stage whose output exists
    if [[ -e $1 ]]; then echo "(skipped: $1 exists; delete it to redo this stage)"; return 0; fi
    return 1
}

# ---------------------------------------------------------------------------------------------- sizes
if [[ $QUICK == 1 ]]; then
    N_TRAIN=300 N_DEV=24 N_TEST=24 N_AAC=40 N_AAC_DEV=8
    BB_FLAGS=(--lm-steps 100 --ctc-steps 60 --eval-utts 16)
    BATCH=8 S1_STEPS=30 S1_WARMUP=5 S3_STEPS=16 S3_WARMUP=4 EVAL_EVERY=8 PATIENCE=2 PAIRS=24 LOG_EVERY=4
    S2_FLAGS=(--allow-chance-level)  # 24 pairs: chance-level MRR 0.157 > 0.05, the smoke run only checks the plumbing
else
    N_TRAIN=3000 N_DEV=100 N_TEST=200 N_AAC=300 N_AAC_DEV=30
    BB_FLAGS=()
    BATCH=16 S1_STEPS=300 S1_WARMUP=20 S3_STEPS=350 S3_WARMUP=10 EVAL_EVERY=175 PATIENCE=3 PAIRS=200 LOG_EVERY=10
    S2_FLAGS=()
fi
# Steps are what the 10 minutes allow; learning is far from done. Base ST BLEU on the test set with (stage-1,
# stage-3) steps: (250, 300) 32.8, (300, 350) 34.2, (300, 400) 35.7, (400, 450) 38.2. At equal utterances seen,
# the stage-1 loss curve hardly moved with the learning rate (2e-3 .. 6e-3), the batch (8 or 16), the Q-Former
# width (128 or 256) or the window (0.12 or 0.33 s); a wider LoRA (r 32 on every projection) gave the same ST
# BLEU but zero-shot MT 64 instead of 84, so the paper's LoRA (r 8 on q_proj, v_proj) stays.

# ---------------------------------------------------------------------------------------------- installs
stage "install"
if ! $PY -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
    run $PY -m pip install -q torch==2.13.0
fi
# requirements-test.txt (with -r requirements.txt and extras such as sacrebleu[ja]): pip only if one is missing
if ! $PY - <<'EOF' 2>/dev/null
import os, sys
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement

def lines(path):
    for line in open(path):
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            yield from lines(os.path.join(os.path.dirname(path), line[2:].strip()))
        elif line:
            yield line

def ok(req, extra=""):
    r = Requirement(req)
    if r.marker is not None and not r.marker.evaluate({"extra": extra}):
        return True
    try:
        v = version(r.name)
    except PackageNotFoundError:
        return False
    return r.specifier.contains(v, prereleases=True) and all(
        ok(dep, e) for e in r.extras for dep in requires(r.name) or [] if "extra ==" in dep)

sys.exit(0 if all(ok(l) for l in lines("requirements-test.txt")) else 1)
EOF
then
    run $PY -m pip install -q -r requirements-test.txt
else
    echo "(requirements-test.txt already satisfied)"
fi

# ---------------------------------------------------------------------------------------------- data and backbones
stage "corpus (demo/corpus.py)"
C=${CORPUS:-$OUT/corpus}
if [[ -z ${CORPUS:-} ]]; then
    # resumable by itself: utterances already on disk are kept
    run $PY demo/corpus.py --out "$C" --seed 0 --n-train $N_TRAIN --n-dev $N_DEV --n-test $N_TEST \
        --n-aac $N_AAC --n-aac-dev $N_AAC_DEV --workers 2
fi

stage "backbones (demo/backbones.py)"
BB=${BACKBONES:-$OUT/backbones}
if [[ -z ${BACKBONES:-} ]] && ! done_already "$BB/backbones.json"; then
    run $PY demo/backbones.py --corpus "$C" --out "$BB" --seed 0 "${BB_FLAGS[@]}"
fi
BEATS=$BB/beats/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt

stage "Whisper input length"
# A Whisper checkpoint takes a fixed 30 s input (3000 mel frames, WhisperEncoder insists), but the demo's clips
# are under 4 s: at 30 s the frozen encoder, mostly on padding, is ~85% of every training step (measured: a step
# of 16 clips 1.2 s -> 0.2 s at 5 s). The same weights with a shorter input: position embeddings cut to the
# longest clip (rounded up to whole seconds, with room for the last Q-Former window), the feature extractor
# padding to that length. The real frames' log-mels are unchanged (Whisper's normalisation depends on the clip's
# maximum, not on the padding) and demo/backbones.py trains its encoder on batch-padded clips, so only the
# amount of padding the encoder attends over changes. Nothing to do when the checkpoint is already short.
WHISPER=$OUT/whisper_short
SHORTEN='import glob, json, math, os, sys
import soundfile as sf
from safetensors.torch import load_file, save_file
import data
src, dst, corpus = sys.argv[1:4]
longest = max(sf.info(e["audio"]).duration for p in sorted(glob.glob(os.path.join(corpus, "*.jsonl")))
              if not p.endswith("meta.jsonl") for e in data.read_manifest(p))
seconds = math.ceil(longest + 17 / 50)  # room for the last 17-frame Q-Former window (a partial one is dropped)
frames = 50 * seconds  # encoder positions, 50 per second (1500 for 30 s)
cfg = json.load(open(os.path.join(src, "config.json")))
positions = cfg["max_source_positions"]
if positions <= frames:  # already short: used as is
    os.symlink(os.path.abspath(src), dst)
    print(f"{src} takes {positions / 50:g} s: used as is")
    sys.exit()
os.makedirs(dst)
w = load_file(os.path.join(src, "model.safetensors"))
w["encoder.embed_positions.weight"] = w["encoder.embed_positions.weight"][:frames].contiguous()
save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
json.dump({**cfg, "max_source_positions": frames}, open(os.path.join(dst, "config.json"), "w"), indent=2)
pre = json.load(open(os.path.join(src, "preprocessor_config.json")))
pre.update(chunk_length=seconds, n_samples=16000 * seconds, nb_max_frames=100 * seconds)
json.dump(pre, open(os.path.join(dst, "preprocessor_config.json"), "w"), indent=2)
print(f"longest clip {longest:.2f} s: Whisper input {seconds} s ({frames} positions) in {dst}")'
if ! done_already "$WHISPER"; then
    echo "+ $PY -c \"\$SHORTEN\" $BB/whisper $WHISPER $C    # with SHORTEN:"
    printf '%s\n' "$SHORTEN" | sed 's/^/    /'
    $PY -c "$SHORTEN" "$BB/whisper" "$WHISPER" "$C"
fi

# ---------------------------------------------------------------------------------------------- the three stages
# The model: the demo backbones, a float32 LLM, a small Q-Former, only the speech windows that cover real audio.
MODEL=(--whisper "$WHISPER" --beats "$BEATS" --llm "$BB/llm" --llm-dtype float32
       --speech-tokens real --qformer-layers 2 --qformer-hidden 128 --qformer-heads 4 --qformer-ffn 256)
LOOP=(--dtype float32 --num-workers 1 --log-every $LOG_EVERY --save-every 100000 --seed 0)

stage "stage 1: ASR + AAC pre-training"
if ! done_already "$OUT/stage1/last.safetensors"; then
    run $PY pretrain.py --train "$C/asr_train.jsonl:1" "$C/aac_train.jsonl:0.1" "${MODEL[@]}" \
        --output-dir "$OUT/stage1" --lr 3e-3 --warmup-start-lr 1e-5 --min-lr 3e-4 --warmup-steps $S1_WARMUP \
        --max-steps $S1_STEPS --batch-size $BATCH --weight-decay 0.05 "${LOOP[@]}"
fi

stage "stage 2: layer selection (MRR)"
if ! done_already "$OUT/stage2/layers.json"; then
    run $PY select_layers.py --init "$OUT/stage1/last.safetensors" --manifest "$C/retrieval_test.jsonl" \
        --output-dir "$OUT/stage2" --num-pairs $PAIRS --threshold 0.05 --ot-iters 50 --batch-size 16 \
        --dtype float32 --num-workers 1 "${S2_FLAGS[@]}"
fi
cp "$OUT/stage2/mrr_per_layer.png" "$OUT/fig4_mrr_per_layer.png"
LAYERS=$($PY -c "import json, sys; print(*json.load(open(sys.argv[1]))['selected'])" "$OUT/stage2/layers.json")
if [[ -n $LAYERS ]]; then
    echo "selected layers: $LAYERS"
    ALIGN=(--layers-from "$OUT/stage2/layers.json")
else  # joint_train.py --layers-from refuses an empty selection; the paper always keeps layer 0
    echo "no layer above the threshold: aligning layer 0"
    LAYERS=0 ALIGN=(--layers 0)
fi

S3=(--init "$OUT/stage1/last.safetensors" --train "$C/st_zh_train.jsonl" --dev "$C/st_zh_dev.jsonl"
    --lr 2e-3 --warmup-start-lr 1e-5 --min-lr 1e-4 --warmup-steps $S3_WARMUP --max-steps $S3_STEPS
    --batch-size $BATCH --weight-decay 0.05 --eval-every $EVAL_EVERY --patience $PATIENCE "${LOOP[@]}")
stage "stage 3: base (--align none)"
if ! done_already "$OUT/stage3_base/best.safetensors"; then
    run $PY joint_train.py --align none "${S3[@]}" --output-dir "$OUT/stage3_base"
fi

stage "stage 3: AI-STA (--align ot)"
if ! done_already "$OUT/stage3_aista/best.safetensors"; then
    run $PY joint_train.py --align ot "${ALIGN[@]}" --alpha 0.99 "${S3[@]}" --output-dir "$OUT/stage3_aista"
fi

# ---------------------------------------------------------------------------------------------- evaluation
EVAL=(--manifest "$C/st_zh_test.jsonl" --mode st mt --num-beams 1 --max-new-tokens 60 --batch-size 16
      --num-workers 1 --alignment $LAYERS --num-pairs $PAIRS --seed 0)
stage "evaluation: base"
if ! done_already "$OUT/eval_base/metrics.json"; then
    run $PY evaluate.py --ckpt "$OUT/stage3_base/best.safetensors" "${EVAL[@]}" --name "base (CE only)" \
        --output-dir "$OUT/eval_base"
fi
stage "evaluation: AI-STA"
if ! done_already "$OUT/eval_aista/metrics.json"; then
    run $PY evaluate.py --ckpt "$OUT/stage3_aista/best.safetensors" "${EVAL[@]}" --name "AI-STA (OT, layers $LAYERS)" \
        --tsne "$OUT/fig5_tsne.png" --output-dir "$OUT/eval_aista"
fi

# ---------------------------------------------------------------------------------------------- results
stage "results"
echo "Stage 2 (paper Figure 4): MRR per layer, threshold 0.05"
$PY -c "
import json, sys
d = json.load(open(sys.argv[1]))
n = d['num_pairs']
for l, v in sorted(d['mrr'].items(), key=lambda kv: int(kv[0])):
    print(f'  layer {int(l):2d}  MRR {v:.4f}' + ('  selected' if int(l) in d['selected'] else ''))
print(f'  (chance level with {n} candidates: MRR = H_n / n = {sum(1 / k for k in range(1, n + 1)) / n:.4f})')
" "$OUT/stage2/layers.json"
echo
echo "Tables 2 and 5 (toy En->Zh test set, greedy decoding; ST = speech in, MT = zero-shot text in;"
echo "log W = alignment degree at the selected layers, lower = closer):"
show $PY evaluate.py --table "$OUT/eval_base/metrics.json" "$OUT/eval_aista/metrics.json"
$PY evaluate.py --table "$OUT/eval_base/metrics.json" "$OUT/eval_aista/metrics.json" | tee "$OUT/table.md"
_close_stage
echo
echo "Figures: $OUT/fig4_mrr_per_layer.png (MRR per layer), $OUT/fig5_tsne.png (t-SNE of layer 0, AI-STA)"
echo "Time per stage:"
printf '  %s\n' "${TIMES[@]}" | tee "$OUT/timing.txt"
printf '  %-34s %4d s\n' total $((SECONDS - T0)) | tee -a "$OUT/timing.txt"
