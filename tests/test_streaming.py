"""Data preparation streams: documents are read in chunks, over-long documents are cut, the
rows are written batch by batch - and the result equals reading the corpus whole."""
import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_config
from tfpretrain.data import cache as cache_mod
from tfpretrain.data import pipeline, sources
from tfpretrain.data.pipeline import pack_corpus
from tfpretrain.objectives import row_format
from tfpretrain.data.sources import DocumentPlan, load_corpus, split_stream
from tfpretrain.data.synthetic import generate_stories
from tfpretrain.errors import UserError

DOCS = generate_stories(200, seed=11)


@pytest.mark.parametrize("separator,text", [
    ("line", "one\ntwo two\n\nthree\r\nfour"),
    ("blank_line", "a b\nc\n\n\nd e\n  \n\t\nf\n\ng h\n"),
    ("<|endoftext|>", "first<|endoftext|>second one<|endoftext|><|endoftext|>third"),
    ("none", "all of it\n\nis one document"),
])
def test_chunked_split_equals_whole_split(separator, text):
    """Every way of cutting the text into chunks gives the documents of the whole text."""
    whole = [d.strip("\n") for d in split_stream([text], separator) if d.strip()]
    assert len(whole) >= 1
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = sorted(rng.choice(len(text), size=rng.integers(1, 6), replace=False))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        got = [d.strip("\n") for d in split_stream(chunks, separator) if d.strip()]
        assert got == whole, chunks


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.jsonl", "c.json.gz"])
def test_files_read_in_small_chunks_give_the_same_documents(tmp_path, monkeypatch, name):
    docs = [d + " naïve café ☃" for d in DOCS[:60]]
    path = tmp_path / name
    if name.startswith("c.jsonl"):
        data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    elif name.startswith("c.json"):  # one JSON value: a list of records
        data = json.dumps([{"text": d} for d in docs], ensure_ascii=False)
    else:
        data = "\n\n".join(docs)
    (gzip.open if name.endswith(".gz") else open)(path, "wb").write(data.encode("utf-8"))
    cfg = tiny_config(tmp_path, data={"path": str(path)})
    expected = sources.read_documents(cfg.data, 0)[0]
    assert expected == docs
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # multi-byte characters straddle chunks
    assert sources.read_documents(cfg.data, 0)[0] == docs


def test_strict_offset_is_exact_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "d.txt"
    good = "ünïcode line\n\n" * 30
    path.write_bytes(good.encode("utf-8") + b"ab\xff")
    cfg = tiny_config(tmp_path, data={"path": str(path), "on_decode_error": "strict"})
    offset = len(good.encode("utf-8")) + 2
    for chunk in (5, 64, 1 << 20):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
        with pytest.raises(UserError, match=rf"d\.txt: invalid UTF-8 at byte offset {offset}\b"):
            DocumentPlan(cfg.data, 0)


def test_an_enormous_document_is_cut_at_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 1000)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)
    words = " ".join(f"w{i}" for i in range(20_000))  # one ~130k-character line
    (tmp_path / "big.txt").write_text(words + "\n\nsmall one\n\n" + words)
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "big.txt")})
    docs = sources.read_documents(cfg.data, 0)[0]
    assert max(len(d) for d in docs) <= 1000 and "small one" in docs
    pieces = docs[:docs.index("small one")]
    assert len(pieces) > 100 and "".join(pieces) == words       # nothing lost, nothing added
    assert all(p.endswith(" ") for p in pieces[:-1])             # cut after whitespace


def test_a_single_huge_line_is_read_in_bounded_memory(tmp_path):
    """A 200 MB file with no newline: the counting pass never holds it (peak RSS stays far
    below the file's size)."""
    path = tmp_path / "one_line.txt"
    with open(path, "w") as fh:
        for _ in range(200):
            fh.write("lorem ipsum dolor sit amet " * 38_000)  # ~1 MB, no newline
    script = textwrap.dedent(f"""
        import resource
        from tfpretrain.config import build_config
        from tfpretrain.data.sources import DocumentPlan, MAX_DOCUMENT_CHARS
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cfg = build_config({{"data": {{"path": {str(path)!r}, "document_separator": "line"}}}})
        plan = DocumentPlan(cfg.data, 0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(sum(plan.counts), int(plan.sizes.max()), plan.chars, (peak - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    docs, largest, chars, grew_mb = map(int, out.stdout.split())
    assert chars == path.stat().st_size and docs >= 200
    assert largest <= sources.MAX_DOCUMENT_CHARS
    assert grew_mb < 120, f"reading a 200 MB line grew RSS by {grew_mb} MB"


@pytest.mark.parametrize("objective,packing", [("causal", "concat"), ("causal", "pad"),
                                               ("mlm", "concat"), ("mlm", "pad")])
def test_streamed_rows_equal_rows_of_the_whole_corpus(tmp_path, monkeypatch, objective,
                                                      packing):
    """prepare tokenizes a few documents at a time and carries partial rows between
    batches; its rows are exactly pack_corpus' rows of the whole corpus in memory."""
    monkeypatch.setattr(pipeline, "TOKENIZE_BATCH", 3)  # partial rows carried across batches
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
    model = {"arch": "bert"} if objective == "mlm" else {}
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "c.txt"), "packing": packing,
                                      "cache_dir": str(tmp_path / "cache")},
                      model={"objective": objective, **model})
    tok, packed, info = cache_mod.prepare(cfg, row_format(cfg), log=lambda m: None)
    corpus = load_corpus(cfg.data, cfg.train.seed)
    whole = pack_corpus(tok, corpus.train, corpus.val, row_format(cfg))
    assert isinstance(packed.train_rows, np.memmap)
    np.testing.assert_array_equal(packed.train_rows, whole.train_rows)
    np.testing.assert_array_equal(packed.val_rows, whole.val_rows)
    np.testing.assert_array_equal(packed.unigram_counts, whole.unigram_counts)
    assert (packed.train_tokens, packed.val_tokens) == (whole.train_tokens, whole.val_tokens)
    assert info["documents"] == (len(corpus.train), len(corpus.val))
    assert info["train_bytes"] == sum(len(d.encode()) for d in corpus.train)


def test_without_the_cache_rows_are_in_memory_and_nothing_is_left_behind(
        tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    cfg = tiny_config(tmp_path, data={"cache": False})
    _, packed, info = cache_mod.prepare(cfg, row_format(cfg), log=lambda m: None)
    assert info["cache"] is None and not isinstance(packed.train_rows, np.memmap)
    assert len(packed.train_rows) > 100 and not list((tmp_path / "t").iterdir())


def test_tokenizer_sample_is_drawn_from_the_whole_training_stream(tmp_path):
    """With more text than tokenizer.train_bytes, the sample is spread over the corpus
    (seeded), not its first megabytes: here both files contribute."""
    (tmp_path / "a.txt").write_text("\n\n".join(f"alpha {d}" for d in DOCS))
    (tmp_path / "b.txt").write_text("\n\n".join(f"beta {d}" for d in DOCS))
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "*.txt")},
                      tokenizer={"train_bytes": 20_000})
    plan = DocumentPlan(cfg.data, 0)
    sample = list(plan.tokenizer_texts(20_000))
    assert sum(map(len, sample)) <= 20_000 and sum(map(len, sample)) > 15_000
    assert any(d.startswith("alpha") for d in sample)
    assert any(d.startswith("beta") for d in sample)
    assert sample == list(DocumentPlan(cfg.data, 0).tokenizer_texts(20_000))  # seeded
    everything = list(plan.tokenizer_texts(10**9))            # less text than the limit:
    assert everything == [d for v, d in plan.route() if not v]  # all training text, in order


def test_a_changed_remote_dataset_is_prepared_again(tmp_path):
    """hf:// and tfds:// sources are keyed by name; the entry records their fingerprint
    (here: the datasets builder hash of a local folder) and a change is noticed."""
    pytest.importorskip("datasets")
    import os

    folder = tmp_path / "hfds"
    folder.mkdir()
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:150]))
    cfg = tiny_config(tmp_path, data={"path": f"hf://{folder}",
                                      "cache_dir": str(tmp_path / "cache")})
    logs = []
    _, first, info = cache_mod.prepare(cfg, row_format(cfg), log=logs.append)
    assert not info["hit"]
    meta = json.loads((Path(info["cache"]) / "meta.json").read_text())
    assert meta["remote_fingerprints"][f"hf://{folder}"]
    assert cache_mod.prepare(cfg, row_format(cfg), log=logs.append)[2]["hit"]
    with open(data, "a") as fh:
        fh.write("".join(json.dumps({"text": "zebra " * 50 + d}) + "\n" for d in DOCS[150:]))
    os.utime(data, (1e9, 1e9))
    logs.clear()
    tok, second, info = cache_mod.prepare(cfg, row_format(cfg), log=logs.append)
    assert not info["hit"] and any("changed since" in m for m in logs)
    assert second.train_tokens + second.val_tokens > first.train_tokens + first.val_tokens
    assert cache_mod.prepare(cfg, row_format(cfg),
                             log=logs.append)[2]["hit"]  # and is cached again


def test_malformed_json_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "ok"},\n {"text": oops}]')
    cfg = tiny_config(tmp_path, data={"path": str(path)})
    with pytest.raises(UserError, match=r"d\.json: malformed JSON \(.* at line 2\)"):
        DocumentPlan(cfg.data, 0)


def test_an_input_error_while_tokenizing_stays_a_user_error(tmp_path, monkeypatch):
    """A source that breaks after the counting pass (a file replaced mid-prepare) fails
    with its own message from inside the tokenizing pipeline, not a TensorFlow error."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = tiny_config(tmp_path, data={"path": str(path), "cache_dir": str(tmp_path / "c")})
    real_route, calls = DocumentPlan.route, []

    def route_then_break(self):  # the tokenizer's sample reads fine; tokenizing does not
        calls.append(1)
        if len(calls) == 2:
            path.write_text('{"text": oops}\n')
        yield from real_route(self)

    monkeypatch.setattr(DocumentPlan, "route", route_then_break)
    with pytest.raises(UserError, match=r"d\.jsonl:1: malformed JSON"):
        cache_mod.prepare(cfg, row_format(cfg), log=lambda m: None)
    assert len(calls) == 2 and not any((tmp_path / "c").rglob("meta.json"))
