"""Evol-Instruct-style rewriting (Xu et al. 2023, WizardLM): each input is rewritten by a
teacher following one of five templates, then failed evolutions are eliminated.

In-depth operations make a prompt harder, adding only 10-20 words (``constraint``,
``deepen``, ``concretize``, ``reasoning``); in-breadth (``breadth``) writes a new prompt
of the same domain. The templates are the paper's, shortened. Elimination follows the
paper's four rules, with ROUGE-L standing in for its ChatGPT judge of "no information gain":

- ``empty``: the rewrite has fewer than ``min_words`` words or no letters;
- ``unchanged``: ROUGE-L F1 with the original >= ``max_rouge`` (no information gain);
- ``shorter``: an in-depth rewrite with fewer words than the original (it lost content);
- ``leak``: it copies the template's own words ("#Rewritten Prompt#", "given prompt") or
  is a refusal ("sorry", "as an AI").

Survivors of round k are what round k + 1 evolves (``rounds``).
"""
from __future__ import annotations

import random
from collections import Counter

from tfpretrain.data.similarity import rouge_l, words

OPS = ("constraint", "deepen", "concretize", "reasoning", "breadth")
DEPTH = ("constraint", "deepen", "concretize", "reasoning")
_METHODS = {
    "constraint": "Please add one more constraint or requirement into #The Given Prompt#.",
    "deepen": "If #The Given Prompt# contains inquiries about certain issues, increase the "
              "depth and breadth of the inquiry.",
    "concretize": "Please replace general concepts with more specific concepts.",
    "reasoning": "If #The Given Prompt# can be solved with just a few simple thinking "
                 "processes, rewrite it to explicitly request multiple-step reasoning.",
}
DEPTH_TEMPLATE = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt "
    "into a more complex version that is still reasonable and understood by humans. "
    "{method} #The Rewritten Prompt# can only add 10 to 20 words into #The Given Prompt#. "
    "'#The Given Prompt#', '#The Rewritten Prompt#', 'given prompt' and 'rewritten prompt' "
    "are not allowed to appear in #The Rewritten Prompt#.\n"
    "#The Given Prompt#:\n{text}\n#The Rewritten Prompt#:\n")
BREADTH_TEMPLATE = (
    "I want you to act as a Prompt Creator. Your goal is to draw inspiration from #The "
    "Given Prompt# to create a brand new prompt. This new prompt should belong to the same "
    "domain as #The Given Prompt# but be even more rare. The length and complexity of "
    "#The Created Prompt# should be similar to that of #The Given Prompt#.\n"
    "#The Given Prompt#:\n{text}\n#The Created Prompt#:\n")
LEAKS = ("given prompt", "rewritten prompt", "created prompt", "#the", "sorry",
         "as an ai", "i cannot", "i can't")
ELIMINATIONS = ("empty", "unchanged", "shorter", "leak")


def template(op: str, text: str) -> str:
    if op == "breadth":
        return BREADTH_TEMPLATE.format(text=text)
    return DEPTH_TEMPLATE.format(method=_METHODS[op], text=text)


def eliminated(op: str, original: str, rewrite: str, min_words: int = 3,
               max_rouge: float = 0.9) -> str | None:
    """Why an evolution failed (one of :data:`ELIMINATIONS`), or None if it stands."""
    new, old = words(rewrite), words(original)
    low = rewrite.lower()
    if len(new) < min_words:
        return "empty"
    if any(s in low for s in LEAKS):
        return "leak"
    if rouge_l(new, old) >= max_rouge:
        return "unchanged"
    if op in DEPTH and len(new) < len(old):
        return "shorter"
    return None


def evolve(teacher, records, writer, make_record, ops: list[str], rounds: int, seed: int,
           sampling, log=print, batch: int = 32) -> dict:
    """Evolve ``records`` ``rounds`` times (one random op each time); writes survivors;
    returns the elimination counts and totals."""
    rng = random.Random(f"tfpretrain-evolve-{seed}")
    removed, made = Counter(), 0
    current = list(records)
    for r in range(1, rounds + 1):
        survivors = []
        for start in range(0, len(current), batch):
            chunk = current[start:start + batch]
            chosen = [rng.choice(ops) for _ in chunk]
            outs = teacher.complete([template(op, rec["text"]) for op, rec in
                                     zip(chosen, chunk)], sampling.max_new_tokens,
                                    sampling.temperature, sampling.top_p,
                                    seed=seed * 1000 + r * 100_003 + start, stop=["\n#"])
            for op, rec, out in zip(chosen, chunk, outs):
                why = eliminated(op, rec["text"], out)
                if why:
                    removed[why] += 1
                    continue
                new = make_record(out, parent=rec["id"], op=op, round=r)
                writer.write(new)
                survivors.append(new)
        made += len(survivors)
        log(f"round {r}/{rounds}: {len(current)} evolved, kept {len(survivors)}, eliminated "
            + ", ".join(f"{k} {removed[k]}" for k in ELIMINATIONS))
        current = survivors
    return {"kept": made, **{f"eliminated_{k}": removed[k] for k in ELIMINATIONS}}
