"""The settings that build the LSM and choose what the alignment compares, as data, with the flags made from them.

    ModelConfig          every hyperparameter of the model (as whisper's ModelDimensions): its fields are the
                         model flags (add_model_args) and the build arguments saved beside the trainable weights
                         (<weights>.json, read back by model.LSM.from_trainable)
    add_alignment_args   the OT flags of stage 2 (select_layers.py), stage 3 (joint_train.py) and the alignment
                         degree (evaluate.py)

It imports torch and ot.py only: evaluate.py builds its command line from it without loading the model stack
(transformers, peft), so --table, --mrr and --hyps start in a few seconds.
"""
import argparse
import dataclasses

import torch

import ot
from beats import BEATS_CKPT_NAME
from runtime import POSITIVE_INT, Range, flag

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

TEMPLATES = {  # the text around the speech tokens; model.LSM.splice puts the instruction at {instruction}
    # SALMONN: "USER: <Speech><SpeechHere></Speech> {instruction}\nASSISTANT:" after the BOS token
    "vicuna": dict(bos=True, before="USER: <Speech>", after="</Speech> {instruction}\nASSISTANT:"),
    # Qwen2-Audio (base): "<|audio_bos|><|AUDIO|><|audio_eos|>{instruction}", no BOS
    "qwen2": dict(bos=False, before="<|audio_bos|>", after="<|audio_eos|>{instruction}"),
}
TEMPLATE_BY_MODEL_TYPE = {"llama": "vicuna", "qwen2": "qwen2"}  # --template auto


def _flag(default, help=None, **argparse_kwargs):
    """A ModelConfig field with its default and what its flag says (help, choices)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclasses.dataclass
class ModelConfig:
    """Everything that builds an LSM besides its weights; defaults: the paper's and SALMONN's. beats=None (the flag
    --no-beats): Whisper only."""
    whisper: str = _flag("openai/whisper-large-v2", "Whisper checkpoint (dir or hub id)")
    beats: str | None = _flag(BEATS_CKPT_NAME, "BEATs checkpoint file")  # None: Whisper only
    beats_unsafe_load: bool = _flag(False, "load --beats with a full unpickle (torch.load weights_only=False) when the "
                                           "safe loader refuses an object in it: runs code from the file, so only for "
                                           "a file you trust")
    llm: str = _flag("Qwen/Qwen2-7B", "LLM dir or hub id (paper: Qwen2-7B or Vicuna-13B-v1.1)")
    llm_dtype: str = _flag("bfloat16", "dtype of the frozen LLM; training (pretrain.py, joint_train.py) refuses "
                                      "float16 (no loss scaling)", choices=list(DTYPES))
    template: str = _flag("auto", "prompt template; auto: llama -> vicuna (SALMONN), qwen2 -> qwen2 (Qwen2-Audio)",
                          choices=["auto", *TEMPLATES])
    speech_tokens: str = _flag("all", "all: always 88 speech tokens (SALMONN); real: only windows overlapping real "
                                      "audio", choices=["all", "real"])
    second_per_window: float = _flag(0.333333, "Q-Former window (and stride), s", type=Range(float, gt=0))
    # flags without a help text: --help shows their name and default
    qformer_layers: int = _flag(2, type=POSITIVE_INT)
    qformer_hidden: int = _flag(768, type=POSITIVE_INT)  # the Q-Former's width (BERT-base)
    qformer_heads: int = _flag(12, type=POSITIVE_INT)
    qformer_ffn: int = _flag(3072, type=POSITIVE_INT)
    lora_r: int = _flag(8, type=POSITIVE_INT)
    lora_alpha: int = _flag(32, type=POSITIVE_INT)  # LoRA's update is alpha / r x BA
    lora_dropout: float = _flag(0.1, type=Range(float, ge=0, lt=1))
    lora_targets: list = _flag(("q_proj", "v_proj"))  # PEFT's default for llama and qwen2

    def __post_init__(self):
        self.lora_targets = list(self.lora_targets)  # a list in the saved JSON, as the flag gives it
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{flag(f.name)} must be one of {choices}, got {getattr(self, f.name)!r}")
            bounds = f.metadata.get("type")
            if isinstance(bounds, Range) and not bounds.holds(getattr(self, f.name)):
                raise ValueError(f"{flag(f.name)} must be {bounds.describe()}, got {getattr(self, f.name)!r}")

    @classmethod
    def from_args(cls, args):
        """The model of parsed add_model_args flags."""
        config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        return dataclasses.replace(config, beats=None) if args.no_beats else config

    def check_training_precision(self):
        """Training supports a bfloat16 LLM (the paper's; any --dtype) and a float32 one. A float16 LLM is refused:
        there is no loss scaling, so gradients flowing back through it to LoRA and the connector underflow to zero
        or overflow to inf (float16's range ends at 65504). evaluate.py and select_layers.py accept float16."""
        if self.llm_dtype == "float16":
            raise ValueError("--llm-dtype float16: training with a float16 LLM is not supported (no gradient scaler); "
                             "train with --llm-dtype bfloat16 (the paper's) or float32 (with --init, the flag "
                             "overrides the checkpoint's .json); evaluate.py decodes in float16 too")


def add_model_flag(group, name, **overrides):
    """The flag of ModelConfig field `name` (overrides: other argparse settings, e.g. default=None)."""
    f = next(f for f in dataclasses.fields(ModelConfig) if f.name == name)
    kwargs = dict(f.metadata, default=f.default)
    if isinstance(f.default, bool):
        kwargs["action"] = "store_true"
    elif isinstance(f.default, tuple):
        kwargs.update(nargs="+", default=list(f.default))
    else:
        kwargs.setdefault("type", type(f.default))
    group.add_argument(flag(name), **{**kwargs, **overrides})


def add_model_args(parser, init=False):
    """The model flags, one per ModelConfig field, and --no-beats. init: the model is rebuilt from --init's .json,
    which the flags given on the command line override (model_overrides); --help says so."""
    g = parser.add_argument_group("model", "the model is rebuilt from --init's .json; a model flag given on the "
                                           "command line overrides it (the defaults below apply only to a fresh "
                                           "model)" if init else None)
    for f in dataclasses.fields(ModelConfig):
        add_model_flag(g, f.name)
        if f.name == "beats":
            g.add_argument("--no-beats", action="store_true",
                           help="Whisper only (the Q-Former then sees Whisper's width)")
    return parser


def model_overrides(make_parser, argv, args):
    """The model flags given on the command line (even if equal to their defaults), as LSM constructor arguments:
    they override what a checkpoint's .json says (e.g. --llm-dtype float32, or a moved --llm folder).
    make_parser() builds the script's parser again; argv: its arguments (None: sys.argv)."""
    p = make_parser()
    for action in p._actions:  # parse again with no defaults: only the given flags land in the namespace
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_known_args(argv)[0]))
    out = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig) if f.name in given}
    if args.no_beats:
        out["beats"] = None
    return out


# ----------------------------------------------------------------------------- what the alignment compares

ALIGN_POSITIONS = ("real", "all")  # model.alignment_mask
OT_COSTS = ("sqeuclidean", "cosine")  # model.cost_points


def add_alignment_args(parser):
    """The flags of the Wasserstein distances between speech and text states (eq. 1), the same in stage 2 (retrieval),
    stage 3 (the loss of eq. 6) and the alignment degree of the evaluation."""
    parser.add_argument("--ot-eps", type=Range(float, ge=ot.EPS_MIN[torch.float32]), default=ot.EPS,
                        help="Sinkhorn epsilon, relative to the cost scale (ot.wasserstein); the states are solved in "
                             "float32, where a smaller eps loses whole units in the exponents (ot.EPS_MIN)")
    parser.add_argument("--ot-iters", type=POSITIVE_INT, default=ot.N_ITERS, help="Sinkhorn iterations")
    parser.add_argument("--ot-cost", default="sqeuclidean", choices=OT_COSTS,
                        help="OT ground cost: sqeuclidean |x - y|^2 (paper eq. 1); cosine 1 - cos(x, y) (beyond the "
                             "paper)")
    parser.add_argument("--align-positions", default="real", choices=ALIGN_POSITIONS,
                        help="the speech positions that are aligned: real = windows overlapping real audio (this "
                             "project's reading of the paper), all = every speech position the LLM saw (the same with "
                             "--speech-tokens real)")
    return parser
