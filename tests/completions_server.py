"""A small OpenAI-compatible completions server on 127.0.0.1 for the URL teacher's tests:
real HTTP and the real request/response JSON of ``POST /v1/completions``, with answers a
test can predict.

``answers``: a list of texts handed out in turn for generation requests (cycled);
a scoring request (``echo: true, logprobs: 0``) gets per-word log-probabilities of
``-log(perplexity)`` where ``perplexity`` is looked up by the text's first word in
``perplexities`` (default 10). Every request body is kept in ``requests``.
"""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CompletionsServer:
    def __init__(self, answers, perplexities=None, score: bool = True):
        self.answers, self.turn = list(answers), 0
        self.perplexities = perplexities or {}
        self.score = score
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.requests.append(body)
                reply = json.dumps(outer.reply(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def reply(self, body: dict) -> dict:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("echo"):
                choices.append({"index": i, "text": p, "logprobs": self._logprobs(p)})
            else:
                choices.append({"index": i, "text": self.answers[self.turn % len(self.answers)]})
                self.turn += 1
        return {"object": "text_completion", "model": body.get("model"), "choices": choices}

    def _logprobs(self, text: str):
        if not self.score:
            return None
        ws = text.split()
        ppl = self.perplexities.get(ws[0] if ws else "", 10.0)
        offsets, pos = [], 0
        for w in ws:
            pos = text.index(w, pos)
            offsets.append(pos)
            pos += len(w)
        values = [None] + [-math.log(ppl)] * (len(ws) - 1)
        return {"tokens": ws, "token_logprobs": values, "text_offset": offsets}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
