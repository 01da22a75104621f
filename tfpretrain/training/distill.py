"""Logit distillation in fit (``distill.*``): which teacher a run may learn from, and
loading it.

The student's objective is ``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``
over the same packed rows (``models.lm.CausalLM.distill_objective``); the teacher is a
trained run folder of the same objective, run in inference mode in float32 inside the
train step. Its logits only mean something over the same vocabulary, so the student takes
the teacher's tokenizer; any other tokenizer is refused before anything is read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from tfpretrain.config import Config, build_config, read_yaml
from tfpretrain.errors import UserError


def teacher_config(cfg: Config) -> Config:
    """The teacher run's config; a missing or unfinished folder is a UserError."""
    folder = Path(cfg.distill.teacher)
    if not (folder / "config.yaml").is_file() or not (folder / "tokenizer").is_dir():
        raise UserError(f"`distill.teacher`: {folder} is not a tfpretrain run folder (no "
                        "config.yaml and tokenizer/); train the teacher first with "
                        "`python -m tfpretrain.fit` and pass its run folder")
    return build_config(read_yaml(folder / "config.yaml"), name=folder.resolve().name,
                        source=str(folder / "config.yaml"))


def resolve(cfg: Config) -> Config:
    """``cfg`` with the teacher's tokenizer (``tokenizer.path``), after checking the teacher
    can teach this student: same objective, a context at least the student's, the same
    tokenizer. Without ``distill.teacher``, ``cfg`` itself."""
    if not cfg.distill.teacher:
        return cfg
    from tfpretrain.objectives import get_objective

    teacher = teacher_config(cfg)
    folder = Path(cfg.distill.teacher)
    problems = []
    if get_objective(teacher) is not get_objective(cfg):
        problems.append(f"the teacher's model.objective is {teacher.model.objective!r}, the "
                        f"student's {cfg.model.objective!r}; they must match")
    if teacher.model.sequence_length < cfg.model.sequence_length:
        problems.append(f"the teacher's context ({teacher.model.sequence_length}) is shorter "
                        f"than the student's model.sequence_length "
                        f"({cfg.model.sequence_length})")
    if cfg.tokenizer.path and not same_tokenizer(Path(cfg.tokenizer.path),
                                                 folder / "tokenizer"):
        problems.append(f"tokenizer.path {cfg.tokenizer.path} is not the teacher's tokenizer "
                        f"({folder / 'tokenizer'}): logits over different vocabularies cannot "
                        "be distilled; unset tokenizer.path to use the teacher's")
    if problems:
        raise UserError(f"`distill.teacher` {folder}: " + "; ".join(problems))
    if cfg.tokenizer.path:
        return cfg
    tok = dataclasses.replace(cfg.tokenizer, path=str(folder / "tokenizer"))
    return dataclasses.replace(cfg, tokenizer=tok)


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizers map text to the same ids (kind and every piece)."""
    from tfpretrain.data.tokenizers import from_path

    ta, tb = from_path(a), from_path(b)
    return ta.kind == tb.kind and list(ta.pieces()) == list(tb.pieces())


def load_teacher(cfg: Config, vocabulary_size: int):
    """(the teacher's config, its float32 model from its latest valid checkpoint, frozen)."""
    from tfpretrain.training.runfolder import load_run

    teacher_cfg, tokenizer, model = load_run(Path(cfg.distill.teacher))
    if tokenizer.vocabulary_size != vocabulary_size:  # resolve() made this impossible
        raise UserError(f"`distill.teacher`: its vocabulary ({tokenizer.vocabulary_size}) "
                        f"differs from the student's ({vocabulary_size})")
    model.trainable = False
    return teacher_cfg, model
