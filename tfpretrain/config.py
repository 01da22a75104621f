"""One typed config tree: YAML + ``--set a.b=value`` overrides, strictly validated.

Every problem (unknown key, wrong type, value out of range, inconsistent pair) is collected
and reported in one :class:`ConfigError`, so a user fixes a config in one go. Field names
match keras_hub arguments where one exists (``vocabulary_size``, ``num_layers``, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from tfpretrain.errors import GUARD_STOP_EXIT, IOERR_EXIT, UserError


def _package_configs() -> Path:
    """The packaged configs: ``tfpretrain/configs`` inside an installed wheel (built from the
    repository's top-level ``configs/``, the one copy in git), else that ``configs/`` of a
    source checkout or editable install."""
    inside = Path(__file__).parent / "configs"
    return inside if inside.is_dir() else Path(__file__).parent.parent / "configs"


PACKAGE_CONFIGS = _package_configs()


class ConfigError(UserError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {source} ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}):\n{lines}")


def _f(default, help: str = "", choices=None, min=None, max=None, min_exclusive=False):
    """A config field with its documentation and allowed range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


TOKENIZER_KINDS = ("auto", "sentencepiece_bpe", "sentencepiece_unigram", "wordpiece",
                   "bytelevel_bpe", "char", "byte")
ARCHS = ("gpt2", "llama", "bert")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt", "wsd")
# Each optimizer's own keys and their defaults (None: decided elsewhere, e.g.
# muon_learning_rate = learning_rate); a key set for an optimizer that has none is an error.
_ADAM = {"beta_1": 0.9, "beta_2": 0.95, "epsilon": 1e-8}
OPTIMIZER_DEFAULTS = {
    "adamw": _ADAM,
    "muon": {**_ADAM, "momentum": 0.95, "nesterov": True, "muon_learning_rate": None,
             "ns_steps": 5},
    "lion": {"beta_1": 0.9, "beta_2": 0.99},
    "adafactor": {},
    "schedule_free_adamw": {**_ADAM, "beta_2": 0.999},
    "sgd": {"momentum": 0.9, "nesterov": False},
}
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)
OPTIMIZER_KEYS = sorted({k for keys in OPTIMIZER_DEFAULTS.values() for k in keys})
# Which architectures each objective trains (tfpretrain.objectives has one class per key)
OBJECTIVE_ARCHS = {"causal": ("gpt2", "llama"), "mlm": ("bert",)}
# Objectives that predict masked tokens: their tokenizer needs [MASK] in its text form, and
# they report masked accuracy, not bits per byte
MASKED_OBJECTIVES = ("mlm",)


@dataclass
class DataConfig:
    path: Optional[Union[str, list]] = _f(
        None, "Text file, glob, directory, `tfds://NAME[/config][@split]`, "
        "`hf://OWNER/NAME[:config][@split]` (Hugging Face datasets, streamed), or a list of them "
        "(.txt, .jsonl, .json, optionally .gz, and .parquet). Unset: the embedded synthetic "
        "story corpus.")
    weights: Optional[list] = _f(None, "Mixing weights, one per `data.path` list entry: the "
                                 "training documents are resampled so that entry i holds "
                                 "weights[i] / sum(weights) of the training bytes (validation "
                                 "is not resampled). Needs `data.split: documents`.")
    val_fraction: float = _f(0.05, "Fraction of the data held out for validation.",
                             min=0.0, max=0.5, min_exclusive=True)
    split: str = _f("documents", "`documents`: hold out whole documents (seeded); "
                    "`tail`: hold out the last fraction of the text, as nanoGPT does.",
                    choices=("documents", "tail"))
    document_separator: str = _f(
        "blank_line", "How a .txt file splits into documents: `line`, `blank_line`, `none` "
        "(whole file is one document) or a literal string such as `<|endoftext|>`.")
    text_field: str = _f("text", "Field (column, feature) holding the text in .jsonl/.json "
                         "records, .parquet files and TFDS datasets.")
    val_path: Optional[Union[str, list]] = _f(
        None, "Validation source(s), read like `data.path` (e.g. "
        "`tfds://tiny_shakespeare@validation`); when set, all of data.path is training data "
        "and val_fraction/split are not used.")
    on_decode_error: str = _f("replace", "Undecodable (non-UTF-8) bytes: `replace` each with "
                              "U+FFFD, `skip` the documents containing them, or `strict`: "
                              "stop with the file and byte offset.",
                              choices=("replace", "skip", "strict"))
    packing: str = _f("concat", "`concat`: documents joined with end-of-text and cut into "
                      "full rows (no padding); `pad`: one document per row (truncated to the "
                      "context), padding weighted 0.", choices=("concat", "pad"))
    document_mask: bool = _f(False, "Causal `concat` rows: each token attends only to "
                             "earlier tokens of its own document, and GPT-2 positions restart "
                             "at every document (the end-of-text token starts a document).")
    cache: bool = _f(True, "Keep the trained tokenizer and the packed rows in a token cache "
                     "keyed by a fingerprint of the sources (path, size, mtime) and settings; "
                     "later runs and resumes read it instead of re-tokenizing.")
    cache_dir: Optional[str] = _f(None, "Token cache folder (unset = "
                                  "$XDG_CACHE_HOME/tfpretrain/tokens, else "
                                  "~/.cache/tfpretrain/tokens).")
    embedded_documents: int = _f(8000, "Number of stories generated for the embedded corpus.",
                                 min=10)
    service: Optional[Union[str, list]] = _f(
        None, "tf.data service feeders that make the training batches instead of this "
        "process: `host:port` or a list of them, each started with `python -m "
        "tfpretrain.data_service --port PORT` on a host that sees the token cache at the "
        "same path. With N feeders, feeder i makes every N-th batch; batches, their order "
        "and exact resume are those of a local run. Needs `data.cache: true` "
        "(docs/distributed.md).")
    service_timeout: int = _f(120, "Seconds a `data.service` feeder may stop answering "
                              "before the run ends with train.rerun_exit_code (rerun to "
                              "resume from the last checkpoint).", min=5)


@dataclass
class TokenizerConfig:
    kind: str = _f("auto", "Tokenizer trained on the training split (`auto`: `wordpiece` for "
                   "`model.arch: bert`, else `sentencepiece_bpe`).", choices=TOKENIZER_KINDS)
    vocabulary_size: int = _f(2048, "Vocabulary size including the 5 special tokens "
                              "(pad, unk, bos, eos, mask). An upper bound for `char` and "
                              "`wordpiece`; ignored for `byte` (always 261).", min=8)
    character_coverage: float = _f(0.9995, "SentencePiece character coverage.",
                                   min=0.0, max=1.0, min_exclusive=True)
    byte_fallback: bool = _f(True, "SentencePiece: encode unseen characters as bytes.")
    train_bytes: int = _f(50_000_000, "About this many characters of training text, drawn "
                          "by document from the whole training split (seeded), train the "
                          "tokenizer.", min=1000)
    path: Optional[str] = _f(None, "Use an existing tokenizer instead of training one: a "
                             "tfpretrain tokenizer folder (a run's `tokenizer/`), a "
                             "SentencePiece `.model` or a WordPiece `vocab.txt` whose first "
                             "ids are pad, unk, bos, eos, mask (0-4; WordPiece: [PAD] [UNK] "
                             "[CLS] [SEP] [MASK]).")


LLAMA_ROPE_THETA, LLAMA_NORM_EPSILON = 10000.0, 1e-6  # keras_hub LlamaBackbone's defaults


@dataclass
class ModelConfig:
    arch: str = _f("gpt2", "`gpt2` (learned positions, LayerNorm, GELU) or `llama` "
                   "(RoPE, RMSNorm, SwiGLU): decoders for `objective: causal`; `bert`: "
                   "encoder for `objective: mlm`.", choices=ARCHS)
    objective: str = _f("causal", "`causal`: next-token prediction; `mlm`: masked-LM "
                        "(BERT/RoBERTa-style, see `mlm.*`; needs `arch: bert`).",
                        choices=tuple(OBJECTIVE_ARCHS))
    num_layers: int = _f(4, "Transformer blocks.", min=1)
    num_heads: int = _f(4, "Attention (query) heads.", min=1)
    num_key_value_heads: Optional[int] = _f(None, "llama only: key/value heads for GQA "
                                            "(unset = num_heads).", min=1)
    hidden_dim: int = _f(128, "Model width.", min=2)
    intermediate_dim: int = _f(512, "Feed-forward width.", min=1)
    dropout: float = _f(0.0, "Dropout rate.", min=0.0, max=1.0)
    z_loss: float = _f(0.0, "Weight of the z-loss (PaLM): z_loss * mean(logsumexp(logits)^2) "
                       "is added to the training loss to keep logits from drifting "
                       "(0 = off; 1e-4 is typical).", min=0.0)
    sequence_length: int = _f(128, "Tokens per training row (context length).", min=2)
    tie_embeddings: bool = _f(True, "Share input and output embeddings (gpt2 always ties).")
    rope_theta: float = _f(LLAMA_ROPE_THETA, "llama only: RoPE base wavelength (Hugging Face's "
                           "`rope_theta`; 10000 in Llama 2, 500000 in Llama 3).", min=0.0,
                           min_exclusive=True)
    norm_epsilon: Optional[float] = _f(None, "llama only: RMSNorm epsilon (Hugging Face's "
                                       "`rms_norm_eps`; unset = 1e-6, keras_hub's default; "
                                       "Llama 2 used 1e-5).", min=0.0, min_exclusive=True)
    init_from: Optional[str] = _f(None, "Start from another model's weights (continued "
                                  "pretraining): a tfpretrain run folder (its latest valid "
                                  "checkpoint, averaged weights where it kept them), a "
                                  "preset tfpretrain exported (`export --format keras` or "
                                  "`hf`), or any keras_hub GPT-2 / Llama / BERT preset or "
                                  "Hugging Face checkpoint keras_hub converts (its tokenizer "
                                  "moves to tfpretrain's special ids, the embedding rows "
                                  "follow); a folder or a kaggle:// / hf:// handle. The "
                                  "optimizer, step, schedule and data position start fresh; "
                                  "the run takes the "
                                  "source's tokenizer (`tokenizer.path`, set when unset) and "
                                  "needs its network (the model.* keys but dropout and "
                                  "z_loss; the error names the --set that fits; llama may "
                                  "change sequence_length, gpt2 and bert may shorten it). A "
                                  "resume never reads it again.")

    @property
    def resolved_norm_epsilon(self) -> float:
        """llama's RMSNorm epsilon: ``norm_epsilon``, else keras_hub's default."""
        return self.norm_epsilon or LLAMA_NORM_EPSILON


@dataclass
class OptimizerConfig:
    name: str = _f("adamw", "Keras's optimizer: `adamw`; `muon` (Newton-Schulz orthogonalized "
                   "momentum on the hidden weight matrices, AdamW on embeddings, norms, "
                   "biases and the output head); `lion`; `adafactor` (factored second "
                   "moments, updates relative to each weight's RMS: its learning_rate is "
                   "larger, ~0.1-0.3 on the tiny models we tested; lr_find tells); "
                   "`schedule_free_adamw` (no decay schedule: "
                   "`schedule` stays `constant`, evaluation and export use the averaged "
                   "weights); `sgd`.", choices=OPTIMIZERS)
    learning_rate: float = _f(3e-3, "Peak learning rate (after warmup); for `muon` the AdamW "
                              "part's.", min=0.0, min_exclusive=True)
    min_learning_rate: float = _f(3e-4, "Learning rate at the end of the decay (cosine, "
                                  "linear, wsd; the floor of inverse_sqrt).", min=0.0)
    warmup_steps: int = _f(100, "Linear warmup steps from 0 to learning_rate.", min=0)
    schedule: Optional[str] = _f(None, "After warmup (unset = `cosine`; `constant` for "
                                 "schedule_free_adamw, the only one it takes): `cosine` to "
                                 "min_learning_rate at train.steps; `linear` to it; "
                                 "`constant`; `inverse_sqrt` (lr * sqrt(warmup / step), "
                                 "floored at min_learning_rate); `wsd` warmup-stable-decay: "
                                 "constant, then the last decay_fraction of train.steps cools "
                                 "down to min_learning_rate (raise train.steps on resume to "
                                 "extend the stable phase).", choices=SCHEDULES)
    decay_fraction: float = _f(0.2, "wsd: fraction of train.steps spent cooling down.",
                               min=0.0, max=1.0, min_exclusive=True)
    cooldown: str = _f("linear", "wsd: cooldown shape, `linear` or `1-sqrt` (MiniCPM / "
                       "Hägele et al.).", choices=("linear", "1-sqrt"))
    weight_decay: float = _f(0.1, "Decoupled weight decay, times the learning rate (not "
                             "applied to biases, norms and embeddings).", min=0.0)
    beta_1: Optional[float] = _f(None, "First-moment decay (adamw, muon's AdamW part, lion, "
                                 "schedule_free_adamw; unset = 0.9).", min=0.0, max=1.0)
    beta_2: Optional[float] = _f(None, "Second-moment decay (adamw, muon's AdamW part, "
                                 "schedule_free_adamw; lion's momentum decay; unset = 0.95, "
                                 "lion 0.99, schedule_free_adamw 0.999).", min=0.0, max=1.0)
    epsilon: Optional[float] = _f(None, "Adam epsilon (adamw, muon's AdamW part, "
                                  "schedule_free_adamw; unset = 1e-8).", min=0.0,
                                  min_exclusive=True)
    momentum: Optional[float] = _f(None, "Momentum (sgd, muon; unset = sgd 0.9, muon 0.95).",
                                   min=0.0, max=1.0)
    nesterov: Optional[bool] = _f(None, "Nesterov momentum (sgd, muon; unset = sgd false, "
                                  "muon true).")
    muon_learning_rate: Optional[float] = _f(
        None, "muon: peak learning rate of the Muon-updated matrices, on the same schedule "
        "(unset = learning_rate: Keras scales each Muon update to AdamW's RMS, "
        "0.2 * sqrt(max(rows, cols)), Moonlight's rule).", min=0.0, min_exclusive=True)
    ns_steps: Optional[int] = _f(None, "muon: Newton-Schulz iterations (unset = 5).", min=1)
    clipnorm: Optional[float] = _f(1.0, "Clip the global gradient norm to this (unset or 0: "
                                   "no clipping).", min=0.0)
    ema: float = _f(0.0, "Keep an exponential moving average of the weights with this "
                    "momentum (0 = off; e.g. 0.998) and validate, sample and export the "
                    "average instead of the trained weights. The momentum at step n is "
                    "min(ema, (1 + n) / (10 + n)), as in TensorFlow's "
                    "ExponentialMovingAverage, so the first weights are soon forgotten; a "
                    "step the guard skips leaves the average as it was. One more copy of "
                    "the weights in the optimizer state and checkpoints. Set it when the "
                    "run starts: a checkpoint resumes only with the value it was written "
                    "with.", min=0.0, max=0.99999)

    def setting(self, key: str):
        """The value ``key`` takes for this optimizer: the config's, or the optimizer's
        default (see OPTIMIZER_DEFAULTS) when unset."""
        value = getattr(self, key)
        return OPTIMIZER_DEFAULTS[self.name].get(key) if value is None else value

    @property
    def resolved_schedule(self) -> str:
        return self.schedule or ("constant" if self.name == "schedule_free_adamw" else "cosine")


@dataclass
class TrainConfig:
    steps: int = _f(800, "Optimizer steps.", min=1)
    batch_size: int = _f(32, "Rows per step.", min=1)
    seed: int = _f(1337, "Seed for data generation, split, shuffling and initialization.",
                   min=0)
    steps_per_execution: int = _f(0, "Steps run per tf.function call (0 = auto: the "
                                  "largest number up to 16 that divides eval.every, "
                                  "checkpoint_every and steps, e.g. 10 for eval.every 250 "
                                  "and steps 2000).", min=0)
    jit_compile: Optional[bool] = _f(None, "XLA-compile the train step (unset = on, except "
                                     "bfloat16 on a CPU, where XLA measured slower, and "
                                     "under a tf.distribute strategy, where true is only "
                                     "possible on GPUs/TPUs).")
    threads: int = _f(0, "Intra-op CPU threads (0 = TensorFlow's default). Inter-op "
                      "threads are set for you: 1 on up to 4 cores when the step is "
                      "XLA-compiled, else TensorFlow's default.", min=0)
    strategy: str = _f("auto", "tf.distribute placement: `one_device`; `mirrored` "
                       "(MirroredStrategy: data parallel over this host's GPUs, or over "
                       "`logical_cpu_devices`); `multi_worker` (MultiWorkerMirroredStrategy "
                       "over the hosts the TF_CONFIG environment variable names); `auto` = "
                       "multi_worker when TF_CONFIG names several tasks, else mirrored when "
                       "several GPUs or logical CPU devices are visible, else one_device. "
                       "train.batch_size stays the global batch (docs/distributed.md).",
                       choices=("auto", "one_device", "mirrored", "multi_worker"))
    worker_timeout: int = _f(300, "multi_worker: seconds to wait for every worker at start, "
                             "and for the others in any one training step or evaluation "
                             "batch (a worker alive but stalled; the first batch of each "
                             "kind, which traces and compiles, may take 4 times as long). A "
                             "worker that dies is noticed within about a minute by "
                             "TensorFlow's health check. Either ends the others with "
                             "train.rerun_exit_code.", min=10)
    rerun_exit_code: int = _f(75, "Exit code of a run that stopped because another process "
                              "was lost or stopped (a multi_worker worker, a data.service "
                              "feeder) and resumes when every process is started again with "
                              "the same command (75 = EX_TEMPFAIL). Kubeflow's `restartPolicy: "
                              "ExitCode` retries only 130, 137, 138 and 143: set 138 there "
                              "(docs/distributed.md).", min=3, max=255)
    logical_cpu_devices: int = _f(0, "Split the CPU into this many logical devices (0 = "
                                  "no split), so `mirrored` runs without GPUs (tests, "
                                  "trying a multi-device setup).", min=0)
    precision: str = _f("auto", "Compute precision (Keras mixed-precision policy; weights, "
                        "checkpoints and exports stay float32; logits, loss, norms' statistics "
                        "and the guard in float32). auto = mixed_bfloat16 on GPUs with bf16 "
                        "(Ampere and newer) and TPUs, mixed_float16 on older GPUs; on CPU "
                        "mixed_bfloat16 when the CPU has native bf16 and a step is >= 1e11 "
                        "model FLOPs (measured faster there), else float32. mixed_float16 "
                        "uses Keras's LossScaleOptimizer.", choices=PRECISIONS)
    grad_accumulation_steps: int = _f(1, "Split each batch into this many micro-batches whose "
                                      "gradients are summed into one optimizer step "
                                      "(batch_size stays the global batch and must divide "
                                      "evenly; steps, schedule, guard and checkpoints count "
                                      "optimizer steps).", min=1)
    price_per_hour: float = _f(0.0, "US$ per device-hour for the cost figures (0 = the "
                               "detected device's typical price; see `tfpretrain.estimate "
                               "--help`).", min=0.0)
    checkpoint_every: int = _f(0, "Commit a checkpoint every this many steps (0 = at each "
                               "evaluation, i.e. eval.every). Also at the end and on "
                               "SIGTERM/SIGINT.", min=0)
    keep_checkpoints: int = _f(3, "Checkpoints kept; older ones are deleted only after a "
                               "newer one is committed.", min=1)
    deterministic: bool = _f(False, "TF op determinism: two runs with the same seed give "
                             "bitwise identical losses and weights (on CPU), and so does a "
                             "resumed run.")
    guard: bool = _f(True, "Stability guard: skip the update (weights and optimizer moments "
                     "unchanged) when the loss or gradient is not finite, or spikes above "
                     "mean + spike_threshold * std of the last spike_window accepted steps.")
    spike_window: int = _f(100, "Accepted steps the spike detector's mean and std cover "
                           "(detection starts once the window is full).", min=2)
    rollback_after: int = _f(8, "After this many consecutive skipped steps, restore the last "
                             "checkpoint and continue past the offending batches (0 = never).",
                             min=0)
    rebaseline_after: int = _f(4, "A finite spike that would make this many skipped steps "
                               "in a row is taken as a new level: it is applied and the spike "
                               "detector starts a fresh window (0 = never; non-finite steps "
                               "are always skipped).", min=0)
    max_rollbacks: int = _f(5, "Stop the run (exit 3, the last good checkpoint intact) "
                            "instead of rolling back more than this many times in all.",
                            min=0)
    rollback_lr_scale: float = _f(1.0, "Multiply the learning rate by this at each rollback "
                                  "(PaLM-style; 1 = keep it).", min=0.0, max=1.0,
                                  min_exclusive=True)
    spike_threshold: float = _f(6.0, "How many standard deviations above the window mean a "
                                "loss or gradient norm counts as a spike (0 = only skip "
                                "non-finite steps).", min=0.0)


@dataclass
class EvalConfig:
    every: int = _f(200, "Validate (and checkpoint, and sample) every this many steps.", min=1)
    steps: int = _f(20, "Validation batches per evaluation (0 = the whole split).", min=0)
    final_steps: int = _f(0, "Validation batches for the final evaluation (0 = the whole "
                          "split).", min=0)
    prompt: str = _f("Once upon a time", "Prompt for the text samples.")
    sample_tokens: int = _f(64, "Tokens generated for each sample.", min=1)
    temperature: float = _f(0.8, "Sampling temperature for samples (0 = greedy).", min=0.0)
    top_k: int = _f(40, "Top-k for samples (0 = off).", min=0)
    sets: Optional[dict] = _f(None, "More validation sets, `{name: path}` (a path, glob, "
                              "folder or list, read like `data.path`), tokenized with the "
                              "run's tokenizer: each is scored at every validation "
                              "(`eval.steps` batches) and in the final evaluation "
                              "(`eval.final_steps`) as `val_<name>_loss` and "
                              "`val_<name>_bits_per_byte` (masked LM: also "
                              "`val_<name>_masked_accuracy`) in the progress line, the "
                              "summary and trackers, `val/<name>_loss` in TensorBoard. For "
                              "forgetting during continued pretraining, or a target domain "
                              "beside the training mix.")
    tasks: Optional[dict] = _f(None, "Zero-shot tasks, `{name: path}` of JSONL task files "
                               "(multiple-choice `{context, choices, label}` or cloze "
                               "`{context, continuation}` items; `synth tasks` makes them "
                               "from held-out text), answered by likelihood at every "
                               "validation and in the final evaluation: `task_<name>_acc` "
                               "in the progress line; it and `_acc_norm`, `_acc_pmi` "
                               "(choices) or `_loss` (cloze) in the summary, the trackers "
                               "and TensorBoard's val run. Causal models only.")


@dataclass
class MlmConfig:
    mask_rate: float = _f(0.15, "Fraction of maskable tokens (not pad/unk/bos/eos/mask) "
                          "selected for prediction in each row.", min=0.0, max=1.0,
                          min_exclusive=True)
    mask_token_rate: float = _f(0.8, "Of the selected tokens, the fraction replaced by [MASK].",
                                min=0.0, max=1.0)
    random_token_rate: float = _f(0.1, "Of the selected tokens, the fraction replaced by a "
                                  "random token (the rest are kept).", min=0.0, max=1.0)
    max_predictions: int = _f(0, "Most predictions per row (0 = auto: "
                              "ceil(mask_rate * sequence_length) + 1).", min=0)
    whole_word: bool = _f(False, "Whole-word masking: all pieces of a word are selected "
                          "together.")


@dataclass
class DistillConfig:
    teacher: Optional[str] = _f(None, "Logit distillation (Hinton et al.; DistilBERT): a "
                                "trained run folder of the same objective whose logits the "
                                "student learns from, computed in inference mode inside the "
                                "train step. The student uses the teacher's tokenizer "
                                "(`tokenizer.path`, set to `<teacher>/tokenizer` when unset; "
                                "another tokenizer is refused). Unset = no distillation.")
    alpha: float = _f(0.5, "Weight of the cross-entropy on the labels; the student's "
                      "objective is alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || "
                      "student_T) over the same real tokens (masked LM: masked positions). "
                      "The logged `loss` stays the cross-entropy.", min=0.0, max=1.0)
    temperature: float = _f(2.0, "Softmax temperature T of both distributions in the KL term.",
                            min=0.0, min_exclusive=True)
    topk: int = _f(0, "0 = the teacher runs inside every train step. K > 0 (causal LM): the "
                   "teacher's K most likely ids and their log-probabilities at temperature T "
                   "are computed once for every training row, kept in the token cache "
                   "(`<data.cache_dir>/teacher_topk/`, shared by every student of that "
                   "teacher; the run folder with `data.cache: false`; 4*K bytes a token) "
                   "and read with the batches; the KL "
                   "term is taken over those K ids and \"the rest\". The teacher then costs "
                   "one forward pass over the corpus instead of one per step.", min=0)
    sampled: bool = _f(False, "With `topk` K: cache K ids drawn from the teacher's "
                       "distribution at temperature T (with replacement, seeded by "
                       "train.seed) instead of its K most likely, and take the KL term as "
                       "their mean log-ratio: an unbiased estimate of the full KL and of its "
                       "gradient, where the top K are a biased lower bound (Anshumann et al. "
                       "2025, sparse logit sampling). Same cache format and size.")


TUNERS = ("random", "grid", "bayesian", "hyperband")


@dataclass
class TuneConfig:
    space: dict = _f({}, "Search space: per dotted config key either a list of choices "
                     "(`[64, 128]`) or a range `{min: 1e-4, max: 1e-2, log: true}` "
                     "(`step:` optional; ints give an integer range).")
    tuner: str = _f("random", "KerasTuner search algorithm.", choices=TUNERS)
    max_trials: int = _f(10, "Trials to run (grid: at most this many grid points; hyperband: "
                         "ignored, the budget decides).", min=1)
    steps_per_trial: int = _f(200, "Training steps of each proxy trial (hyperband: of the "
                              "longest trials).", min=1)
    objective: str = _f("val_loss", "What the search minimizes: `val_loss`; "
                        "`val_bits_per_byte` compares across tokenizers; "
                        "`val_<name>_loss` or `val_<name>_bits_per_byte` of an `eval.sets` "
                        "entry (tune for a target domain while training on a mix); or what "
                        "it maximizes: `task_<name>_acc` of an `eval.tasks` entry.")


@dataclass
class TrackConfig:
    mlflow: bool = _f(False, "Also log params, per-step metrics, samples and artifacts to MLflow "
                      "(pip install 'tfpretrain[mlflow]').")
    mlflow_uri: Optional[str] = _f(None, "MLflow tracking URI: a server (http://host:5000), "
                                   "a database (sqlite:///path/mlflow.db) or a file store "
                                   "(file:./mlruns, deprecated by MLflow 3); unset = "
                                   "sqlite:///mlflow.db in the current folder.")
    parent_run_id: Optional[str] = _f(None, "MLflow run to nest this run under (tune sets it: "
                                      "a search is a parent run, each trial a child).")
    wandb: bool = _f(False, "Also log to Weights & Biases (pip install wandb); offline mode, "
                     "files under <run>/wandb, when WANDB_API_KEY is not set.")
    experiment: Optional[str] = _f(None, "MLflow experiment / W&B project (unset = the config "
                                   "name).")


@dataclass
class DebugConfig:
    nan_at_step: int = _f(0, "Fault injection for tests and drills: poison the batch of this "
                          "step (its data position) so its loss is NaN (0 = off).", min=0)
    nan_for_steps: int = _f(1, "Fault injection: how many consecutive batches from "
                            "nan_at_step are poisoned.", min=1)
    spike_at_step: int = _f(0, "Fault injection: multiply the loss of this step by 1000 "
                            "(0 = off).", min=0)
    spike_for_steps: int = _f(1, "Fault injection: how many consecutive steps from "
                              "spike_at_step have their loss multiplied by 1000 (a large value "
                              "makes a sustained, finite level shift).", min=1)
    slow_checkpoint_seconds: float = _f(0.0, "Fault injection: sleep this long inside every "
                                        "checkpoint write, before it is committed.", min=0.0)
    slow_export_seconds: float = _f(0.0, "Fault injection: sleep this long inside the export, "
                                    "after the save and before the check and publish.",
                                    min=0.0)


@dataclass
class ExportConfig:
    enabled: bool = _f(True, "Export a SavedModel at the end of fit.")
    dir: str = _f("saved_models", "Export root: <dir>/<name>/<version>/ (TF Serving layout).")
    name: Optional[str] = _f(None, "Model name (unset = the run folder's name).")
    validate: bool = _f(True, "Reload the export in a fresh process (tensorflow + "
                        "tensorflow_text only), compare logits and greedy generation with "
                        "the Keras model and scan its ops before publishing it.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    name: str = "default"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "name"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def all_keys() -> list[str]:
    keys = []
    for sec, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            keys.append(f"{sec}.{f.name}")
    return keys


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_describe(a) for a in args)
        return inner + " (or null)" if type(None) in typing.get_args(tp) else inner
    if tp is list or origin is list:
        return "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp))


def _coerce(value, tp):
    """Return (ok, value) converting YAML scalars to the field's type where it is lossless."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return (isinstance(value, bool), value)
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                return False, value
            return (f.is_integer(), int(f) if f.is_integer() else value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return (isinstance(value, str), value)
    if tp is list or origin is list:
        return (isinstance(value, list), value)
    if tp is dict or origin is dict:
        return (isinstance(value, dict), value)
    return True, value


def _check_range(key, value, meta, problems):
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        problems.append(f"`{key}` must be one of {', '.join(map(str, choices))}. "
                        f"Received: {value!r}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"`{key}` must be finite. Received: {value!r}")
            return
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            problems.append(f"`{key}` must be {op} {lo}. Received: {value!r}")
        if hi is not None and value > hi:
            problems.append(f"`{key}` must be <= {hi}. Received: {value!r}")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def build_config(raw: dict, name: str = "default", source: str = "config") -> Config:
    """Validate a nested dict (from YAML + overrides) into a Config, or raise ConfigError."""
    problems: list[str] = []
    classes = _section_classes()
    sections = {}
    raw = dict(raw or {})
    raw.pop("name", None)
    problems.extend(_check_plain_name("name", name))
    for key in raw:
        if key not in classes:
            problems.append(f"unknown section `{key}`.{_suggest(key, list(classes) + all_keys())}"
                            f" Sections: {', '.join(classes)}")
    for sec, cls in classes.items():
        values = raw.get(sec) or {}
        if not isinstance(values, dict):
            problems.append(f"`{sec}` must be a mapping of keys. Received: {values!r}")
            values = {}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in values.items():
            dotted = f"{sec}.{k}"
            if k not in fields:
                problems.append(f"unknown key `{dotted}`.{_suggest(dotted, all_keys())}")
                continue
            ok, cv = _coerce(v, hints[k])
            if not ok:
                problems.append(f"`{dotted}` must be {_describe(hints[k])}. Received: {v!r}")
                continue
            _check_range(dotted, cv, fields[k].metadata, problems)
            kwargs[k] = cv
        sections[sec] = cls(**kwargs)
    cfg = Config(**sections, name=name)
    if not problems:
        problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def host_port(address) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port); None unless both parts are there and the port is a
    number (one parser for TF_CONFIG, tune's --chief/--oracle and ``data.service``)."""
    host, _, port = str(address).rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def _tune_objective_checks(c: Config) -> list[str]:
    """``tune.objective``: a metric every trial's summary has."""
    sets = c.eval.sets if isinstance(c.eval.sets, dict) else {}
    tasks = c.eval.tasks if isinstance(c.eval.tasks, dict) else {}
    allowed = ["val_loss", "val_bits_per_byte"] + [
        f"val_{name}_{metric}" for name in sets for metric in ("loss", "bits_per_byte")] + [
        f"task_{name}_acc" for name in tasks]
    if c.tune.objective in allowed:
        return []
    return [f"`tune.objective` must be one of {', '.join(allowed)} (an `eval.sets` entry "
            f"`name` adds val_<name>_loss and val_<name>_bits_per_byte, an `eval.tasks` "
            f"entry task_<name>_acc). Received: {c.tune.objective!r}"]


EVAL_SET_NAME = r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*"  # an eval.sets name: part of metric names
SET_LOSS = re.compile(rf"val_({EVAL_SET_NAME})_loss")  # an eval.sets entry's loss metric
TASK_ACC = re.compile(rf"task_({EVAL_SET_NAME})_acc")  # an eval.tasks entry's accuracy


def maximized(metric: str) -> bool:
    """Whether a bigger value of a summary metric is better (a task's accuracy)."""
    return TASK_ACC.fullmatch(metric) is not None


def _eval_set_checks(c: Config) -> list[str]:
    """``eval.sets`` and ``eval.tasks``: names that make metric names, each with a path (a
    set: or a list of paths); tasks need a causal model."""
    p = []
    for key, lists in (("sets", True), ("tasks", False)):
        entries = getattr(c.eval, key)
        if not isinstance(entries, dict):  # None, or not a mapping (the type check says so)
            continue
        bad = [name for name, spec in entries.items()
               if not re.fullmatch(EVAL_SET_NAME, str(name))
               or not (isinstance(spec, str) and spec.strip() or lists and isinstance(
                   spec, list) and spec and all(isinstance(x, str) for x in spec))]
        if entries and not bad:
            continue
        example = "{stories: stories_val.txt}" if lists else "{endings: endings.jsonl}"
        p.append(f"`eval.{key}` must map names (letters, digits, single `_`) to a path"
                 f"{' or a list of paths' if lists else ''}, e.g. `--set 'eval.{key}="
                 f"{example}'`. Received: {entries!r}"
                 + (f" (bad: {', '.join(map(str, bad))})" if bad else ""))
    if c.eval.tasks and c.model.objective in MASKED_OBJECTIVES:
        p.append("`eval.tasks` scores continuations by likelihood, which needs a causal "
                 f"model: drop it, or use `model.objective: causal`. Received: "
                 f"objective={c.model.objective}")
    return p


def _check_plain_name(key: str, value) -> list[str]:
    """A name that becomes a folder name (runs/<name>, <export.dir>/<export.name>) must be a
    plain name: no path separators, not "." or "..", not absolute, not empty."""
    if value is None:
        return []
    text = str(value)
    if (not text.strip() or text in (".", "..") or "/" in text or "\\" in text
            or "\0" in text or Path(text).is_absolute()):
        return [f"`{key}` must be a plain name (no `/`, `\\`, `..`; not absolute), it "
                f"becomes a folder name. Received: {text!r}"]
    return []


def _cross_checks(c: Config) -> list[str]:
    """Problems that involve more than one key, section by section."""
    return (_model_checks(c) + _objective_checks(c) + _optimizer_checks(c)
            + _schedule_checks(c)
            + _check_space(c.tune.space, c.tune.tuner) + _data_checks(c)
            + _check_plain_name("export.name", c.export.name) + _exit_code_checks(c)
            + _eval_set_checks(c) + _tune_objective_checks(c))


def _exit_code_checks(c: Config) -> list[str]:
    taken = {GUARD_STOP_EXIT: "a stop of the stability guard",
             IOERR_EXIT: "a refused write (disk full)"}
    code = c.train.rerun_exit_code
    return [f"`train.rerun_exit_code` {code} is tfpretrain's exit code for {taken[code]}; "
            "choose another (75, or 138 under Kubeflow's restartPolicy: ExitCode)"] \
        if code in taken else []


def _model_checks(c: Config) -> list[str]:
    p, m = [], c.model
    if m.hidden_dim % m.num_heads:
        p.append(f"`model.hidden_dim` must be divisible by `model.num_heads`. "
                 f"Received: hidden_dim={m.hidden_dim}, num_heads={m.num_heads}")
    if m.num_key_value_heads is not None:
        if m.arch != "llama":
            p.append("`model.num_key_value_heads` is only used by `model.arch: llama`. "
                     f"Received: arch={m.arch}, num_key_value_heads={m.num_key_value_heads}")
        elif m.num_heads % m.num_key_value_heads:
            p.append("`model.num_heads` must be divisible by `model.num_key_value_heads`. "
                     f"Received: num_heads={m.num_heads}, "
                     f"num_key_value_heads={m.num_key_value_heads}")
    if m.arch != "llama" and (m.rope_theta != LLAMA_ROPE_THETA or m.norm_epsilon is not None):
        p.append("`model.rope_theta` and `model.norm_epsilon` are only used by `model.arch: "
                 f"llama`. Received: arch={m.arch}, rope_theta={m.rope_theta}, "
                 f"norm_epsilon={m.norm_epsilon}")
    if m.arch == "gpt2" and not m.tie_embeddings:
        p.append("`model.tie_embeddings: false` needs `model.arch: llama` "
                 "(keras_hub's GPT2Backbone always ties). Received: arch=gpt2")
    return p


def _objective_checks(c: Config) -> list[str]:
    p, m = [], c.model
    if m.arch not in OBJECTIVE_ARCHS[m.objective]:
        p.append("`model.objective: mlm` goes with `model.arch: bert` (an encoder), "
                 "`causal` with gpt2 or llama. "
                 f"Received: arch={m.arch}, objective={m.objective}")
    if m.objective in MASKED_OBJECTIVES:
        if c.tokenizer.kind in ("char", "byte"):
            p.append("`model.objective: mlm` needs a tokenizer with a [MASK] token in its text "
                     "form: `wordpiece`, `sentencepiece_bpe` or `sentencepiece_unigram` "
                     f"(or `auto`). Received: tokenizer.kind={c.tokenizer.kind}")
        if c.mlm.mask_token_rate + c.mlm.random_token_rate > 1:
            p.append("`mlm.mask_token_rate` + `mlm.random_token_rate` must be <= 1. Received: "
                     f"{c.mlm.mask_token_rate} + {c.mlm.random_token_rate}")
        if c.tune.objective in ("val_bits_per_byte",):  # a metric masked LMs do not report
            p.append("`tune.objective: val_bits_per_byte` is for causal models; masked-LM "
                     "runs report val_loss and val_masked_accuracy")
        if m.sequence_length < 3:
            p.append("masked-LM rows need `model.sequence_length` >= 3 ([CLS] text [SEP])")
    if c.distill.sampled and not c.distill.topk:
        p.append("`distill.sampled` draws the cached `distill.topk` ids from the teacher: set "
                 "`distill.topk` (e.g. 16) too")
    if c.distill.topk and (not c.distill.teacher or m.objective in MASKED_OBJECTIVES
                           or c.data.service):
        p.append("`distill.topk` caches a causal teacher's predictions per training row: it "
                 "needs `distill.teacher`, `model.objective: causal` (masked-LM masks change "
                 "every step) and no `data.service` (its feeders make batches without them). "
                 f"Received: teacher={c.distill.teacher}, objective={m.objective}, "
                 f"service={c.data.service}")
    if c.data.document_mask and (m.objective in MASKED_OBJECTIVES
                                 or c.data.packing != "concat"):
        p.append("`data.document_mask: true` is for causal `concat` rows (pad rows and "
                 f"masked-LM rows hold one document already or attend both ways). Received: "
                 f"objective={m.objective}, packing={c.data.packing}")
    return p


def _optimizer_checks(c: Config) -> list[str]:
    """A key of another optimizer, set for this one, is a mistake worth naming."""
    p, o = [], c.optimizer
    own = OPTIMIZER_DEFAULTS[o.name]
    for key in OPTIMIZER_KEYS:
        if getattr(o, key) is not None and key not in own:
            users = ", ".join(n for n, keys in OPTIMIZER_DEFAULTS.items() if key in keys)
            p.append(f"`optimizer.{key}` does not apply to `optimizer.name: {o.name}` (it is "
                     f"used by: {users}). Remove it, or choose one of those optimizers")
    if o.ema and o.name == "schedule_free_adamw":
        p.append("`optimizer.ema` averages the weights, and `schedule_free_adamw` already "
                 "evaluates its own average of them: use one of the two")
    if o.name == "schedule_free_adamw" and o.resolved_schedule != "constant":
        p.append("`optimizer.name: schedule_free_adamw` needs no decay schedule: leave "
                 "`optimizer.schedule` unset or `constant` (warmup_steps still applies). "
                 f"Received: schedule={o.schedule}")
    return p


def _schedule_checks(c: Config) -> list[str]:
    p, o, t = [], c.optimizer, c.train
    if o.warmup_steps >= t.steps:
        p.append(f"`optimizer.warmup_steps` must be < `train.steps`. "
                 f"Received: warmup_steps={o.warmup_steps}, steps={t.steps}")
    if o.min_learning_rate > o.learning_rate:
        p.append(f"`optimizer.min_learning_rate` must be <= `optimizer.learning_rate`. "
                 f"Received: min_learning_rate={o.min_learning_rate}, "
                 f"learning_rate={o.learning_rate}")
    if t.batch_size % t.grad_accumulation_steps:
        p.append("`train.batch_size` (the global batch) must be divisible by "
                 "`train.grad_accumulation_steps`. Received: "
                 f"batch_size={t.batch_size}, grad_accumulation_steps={t.grad_accumulation_steps}")
    if t.steps_per_execution:
        for key, value in (("eval.every", c.eval.every), ("train.steps", t.steps),
                           ("train.checkpoint_every", t.checkpoint_every)):
            if value % t.steps_per_execution:
                p.append(f"`{key}` must be a multiple of `train.steps_per_execution`. "
                         f"Received: {key.split('.')[1]}={value}, "
                         f"steps_per_execution={t.steps_per_execution}")
    return p


def _data_checks(c: Config) -> list[str]:
    p = []
    sep = c.data.document_separator
    if not sep:
        p.append("`data.document_separator` must not be empty: use `line`, `blank_line`, "
                 "`none` or a literal string")
    path = c.data.path
    w = c.data.weights
    if w is not None:
        if not isinstance(path, list) or len(w) != len(path):
            p.append("`data.weights` needs `data.path` to be a list with one weight per entry. "
                     f"Received: path={path!r}, weights={w!r}")
        elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                     for x in w):
            p.append(f"`data.weights` must be positive numbers. Received: {w!r}")
        elif c.data.split != "documents" or c.data.val_path is not None:
            p.append("`data.weights` works with `data.split: documents` and no `data.val_path`")
    if isinstance(path, list) and (not path or not all(isinstance(x, str) for x in path)):
        p.append(f"`data.path` must be a path or a non-empty list of paths. Received: {path!r}")
    return p + _service_checks(c)


def _service_checks(c: Config) -> list[str]:
    service = c.data.service
    if service is None:
        return []
    items = [service] if isinstance(service, str) else service
    bad = [a for a in items if not isinstance(a, str)
           or host_port(a.removeprefix("grpc://")) is None]
    if not items or bad:
        return [f"`data.service` must be `host:port` or a non-empty list of them (feeders "
                f"started with `python -m tfpretrain.data_service`). Received: {service!r}"]
    if not c.data.cache:
        return ["`data.service` needs `data.cache: true`: the feeders read the token cache"]
    return []


def _check_space(space: dict, tuner: str) -> list[str]:
    """Each key a real config key; each value a non-empty list or a {min, max} range."""
    p = []
    keys = all_keys()
    for key, spec in space.items():
        where = f"`tune.space.{key}`"
        if key not in keys or key.startswith(("tune.", "debug.")):
            p.append(f"{where}: not a tunable config key.{_suggest(str(key), keys)}")
            continue
        if isinstance(spec, list):
            if not spec:
                p.append(f"{where}: the list of choices is empty")
        elif isinstance(spec, dict):
            extra = set(spec) - {"min", "max", "log", "step"}
            if extra or "min" not in spec or "max" not in spec:
                p.append(f"{where}: a range needs `min` and `max` (optional `log`, `step`). "
                         f"Received: {spec!r}")
                continue
            try:
                lo, hi = float(spec["min"]), float(spec["max"])
            except (TypeError, ValueError):
                p.append(f"{where}: `min` and `max` must be numbers. Received: {spec!r}")
                continue
            if lo >= hi:
                p.append(f"{where}: `min` must be < `max`. Received: {spec!r}")
            if spec.get("log") and lo <= 0:
                p.append(f"{where}: log sampling needs `min` > 0. Received: {spec!r}")
            both_int = all(isinstance(spec[k], int) for k in ("min", "max"))
            if tuner == "grid" and not both_int and "step" not in spec:
                p.append(f"{where}: grid search needs a list of choices or a `step` for a "
                         f"float range. Received: {spec!r}")
        else:
            p.append(f"{where}: must be a list of choices or a {{min, max}} range. "
                     f"Received: {spec!r}")
    return p


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c.d=x"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    problems = []
    for item in items or []:
        if "=" not in item:
            problems.append(f"--set expects KEY=VALUE, e.g. --set train.steps=100. "
                            f"Received: {item!r}")
            continue
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            problems.append(f"--set key must be `section.key` (e.g. train.steps). "
                            f"Received: {key!r}.{_suggest(key, all_keys())}")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            out[parts[0]] = {}
        out[parts[0]][parts[1]] = value
    if problems:
        raise ConfigError(problems, "--set")
    return out


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` section by section (nested dicts merged, not replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def packaged_configs() -> list[str]:
    """Names of the configs that ship with tfpretrain (``--config NAME`` picks one)."""
    return sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))


def default_config_path() -> Path:
    """The packaged default config, so `fit` works from any folder."""
    return PACKAGE_CONFIGS / "default.yaml"


def resolve_config_path(name_or_path: Optional[str]) -> Path:
    """A YAML file's path, or a packaged config's name (``char-cpu``) -> its path. A name
    that is neither names the packaged configs in the error."""
    if not name_or_path:
        return default_config_path()
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    packaged = PACKAGE_CONFIGS / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise UserError(f"--config: {name_or_path!r} is neither a file nor a packaged config. "
                    f"Packaged configs: {', '.join(packaged_configs())}")


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one
    silently, so a config would not say what it seems to)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--config: {path} is a folder; give a YAML file or a packaged "
                        f"config's name ({', '.join(packaged_configs())})")
    if not path.is_file():
        raise UserError(f"--config: no such file: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--config: {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config: {path} must contain a mapping of sections "
                        f"(data:, model:, ...). Received: {type(raw).__name__}")
    return raw


def load_raw(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> dict:
    """The config file (name or path) with ``--set`` overrides merged in, unvalidated."""
    return merge(read_yaml(resolve_config_path(path)), parse_overrides(overrides or []))


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """``--config`` (a packaged config's name or a YAML path; default: the packaged default)
    plus ``--set`` overrides, validated."""
    cfg_path = resolve_config_path(path)
    raw = load_raw(path, overrides)
    name = raw.get("name") if isinstance(raw.get("name"), str) else cfg_path.stem
    return build_config(raw, name=name, source=str(cfg_path) if path else "config")


def config_from_dict(d: dict) -> Config:
    return build_config(d, name=d.get("name", "default"))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted config keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def markdown_reference() -> str:
    """docs/config.md's reference tables, generated from the field metadata."""
    out = []
    for sec, cls in _section_classes().items():
        out += [f"**`{sec}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata["help"]
            if f.metadata.get("choices"):
                text += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            text = text.replace("|", "\\|")
            shown = yaml.safe_dump(default).strip().removesuffix("...").strip()
            out.append(f"| `{sec}.{f.name}` | `{shown}` | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_reference())
