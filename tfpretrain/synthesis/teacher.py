"""Teachers that write and score text for ``synth``: a run folder, an exported SavedModel,
or any server speaking the OpenAI completions protocol (vLLM, llama.cpp server, Ollama).

A teacher has two methods:

- ``complete(prompts, max_new_tokens, temperature, top_p, seed, stop)`` -> the
  continuation of each prompt (without the prompt), cut at the first ``stop`` string (and,
  for our models, at the end-of-text token);
- ``perplexity(texts)`` -> per-token perplexity of each text under the teacher, or None
  where the teacher cannot score (a server that returns no log-probabilities).

``open_teacher(spec)`` picks the kind: ``http://`` / ``https://`` -> :class:`URLTeacher`;
a folder with ``saved_model.pb`` (or a version folder under it) -> :class:`SavedModelTeacher`;
a folder with ``config.yaml`` -> :class:`RunTeacher`.
"""
from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

from tfpretrain.errors import UserError


def _cut(text: str, stop) -> str:
    for s in stop or ():
        if s and s in text:
            text = text[:text.index(s)]
    return text


def _strip_prompt(full: str, echoed: str) -> str:
    """The continuation: ``full`` minus the detokenized prompt it starts with."""
    return full[len(echoed):] if full.startswith(echoed) else full


class _ModelTeacher:
    """Shared by the run and SavedModel teachers: batches of prompts through ``_sample``
    (prompt + continuation texts) and ``_score`` (log-likelihood, token count)."""

    batch = 16

    def complete(self, prompts, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0,
                 stop=()):
        out = []
        for start in range(0, len(prompts), self.batch):
            chunk = list(prompts[start:start + self.batch])
            echoed = self._sample(chunk, 0, 0.0, 1.0, 0)
            full = self._sample(chunk, max_new_tokens, temperature, top_p, seed + start)
            out += [_cut(_strip_prompt(f, e), stop).strip() for f, e in zip(full, echoed)]
        return out

    def perplexity(self, texts):
        out = []
        for start in range(0, len(texts), self.batch):
            ll, n = self._score(list(texts[start:start + self.batch]))
            out += [math.exp(min(-a / max(b, 1), 50.0)) for a, b in zip(ll, n)]
        return out


class RunTeacher(_ModelTeacher):
    """A run folder's model (float32, latest valid checkpoint) with its tokenizer."""

    def __init__(self, run_dir: Path):
        import tensorflow as tf

        from tfpretrain.models.generation import Sampler
        from tfpretrain.objectives.causal import score_texts
        from tfpretrain.training.runfolder import load_run

        from tfpretrain.objectives import get_objective

        cfg, self.tokenizer, self.model = load_run(Path(run_dir))
        if not get_objective(cfg).writes_text:
            raise UserError(f"--teacher {run_dir}: a {cfg.model.objective} model cannot write "
                            "text; use a causal (gpt2/llama) run")
        self.name = f"run:{Path(run_dir).resolve().name}"
        self.sampler = Sampler(self.model, self.tokenizer)
        self._score_fn = tf.function(lambda t: score_texts(self.model, self.tokenizer, t))

    def _sample(self, prompts, max_new_tokens, temperature, top_p, seed):
        if max_new_tokens == 0:
            return [self.tokenizer.decode(self.tokenizer.encode(p)) for p in prompts]
        return self.sampler.run(prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed)[1]

    def _score(self, texts):
        import tensorflow as tf

        r = self._score_fn(tf.constant(texts))
        return r["log_likelihood"].numpy().tolist(), r["num_tokens"].numpy().tolist()


class SavedModelTeacher(_ModelTeacher):
    """An exported SavedModel (``sample`` and ``score`` signatures), as TF Serving loads it."""

    def __init__(self, path: Path):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(path))
        missing = {"sample", "score"} - set(self.loaded.signatures)
        if missing:
            raise UserError(f"--teacher {path}: the SavedModel has no {', '.join(missing)} "
                            "signature (export a causal run with `python -m tfpretrain.export`)")
        self.name = f"saved_model:{path}"

    def _sample(self, prompts, max_new_tokens, temperature, top_p, seed):
        import tensorflow as tf

        r = self.loaded.signatures["sample"](
            prompts=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens),
            temperature=tf.constant(float(temperature)), top_k=tf.constant(0),
            top_p=tf.constant(float(top_p)), seed=tf.constant(int(seed)))
        return [t.decode("utf-8", errors="replace") for t in r["text"].numpy()]

    def _score(self, texts):
        import tensorflow as tf

        r = self.loaded.signatures["score"](text=tf.constant(texts))
        return r["log_likelihood"].numpy().tolist(), r["num_tokens"].numpy().tolist()


class URLTeacher:
    """An OpenAI-compatible ``/v1/completions`` endpoint; ``OPENAI_API_KEY`` (if set) is
    sent as the bearer token. Scoring asks for the prompt's log-probabilities
    (``echo: true, logprobs: 0``); a server that does not return them cannot score."""

    def __init__(self, url: str, model: str = "default", timeout: float = 120.0):
        self.url = url if url.rstrip("/").endswith("/completions") else \
            url.rstrip("/") + ("/completions" if url.rstrip("/").endswith("/v1")
                               else "/v1/completions")
        self.model, self.timeout = model, timeout
        self.name = f"url:{url}#{model}"

    def _post(self, body: dict) -> dict:
        data = json.dumps({"model": self.model, **body}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise UserError(f"--teacher {self.url}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--teacher {self.url}: no completions server answered ({exc}); "
                            "start it (vLLM, llama.cpp server, Ollama) or check the URL"
                            ) from None

    def _choices(self, reply: dict, n: int) -> list:
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise UserError(f"--teacher {self.url}: expected {n} choices, the server "
                            f"returned {len(choices)}")
        return choices

    def complete(self, prompts, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0,
                 stop=()):
        reply = self._post({"prompt": list(prompts), "max_tokens": max_new_tokens,
                            "temperature": temperature, "top_p": top_p, "seed": seed,
                            **({"stop": list(stop)} if stop else {})})
        return [_cut(c.get("text", ""), stop).strip()
                for c in self._choices(reply, len(prompts))]

    def perplexity(self, texts):
        reply = self._post({"prompt": list(texts), "max_tokens": 1, "echo": True,
                            "logprobs": 0, "temperature": 0.0})
        out = []
        for text, c in zip(texts, self._choices(reply, len(texts))):
            lp = c.get("logprobs") or {}
            values, offsets = lp.get("token_logprobs"), lp.get("text_offset")
            if not values:
                return None
            offsets = offsets or list(range(len(values)))
            own = [v for v, o in zip(values, offsets) if v is not None and o < len(text)]
            out.append(math.exp(min(-sum(own) / max(len(own), 1), 50.0)))
        return out


def open_teacher(spec: str, model: str = "default"):
    """The teacher named by ``--teacher``: a URL, a SavedModel or a run folder."""
    if spec.startswith(("http://", "https://")):
        return URLTeacher(spec, model)
    path = Path(spec)
    if (path / "saved_model.pb").is_file():
        return SavedModelTeacher(path)
    versions = sorted((p for p in path.glob("*/saved_model.pb")),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    if versions:  # a TF Serving model folder: its newest version
        return SavedModelTeacher(versions[-1].parent)
    if (path / "config.yaml").is_file():
        return RunTeacher(path)
    raise UserError(f"--teacher {spec}: not a URL (http://host:port/v1), a SavedModel folder "
                    "(saved_model.pb) or a tfpretrain run folder (config.yaml)")
