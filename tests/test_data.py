import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfpretrain.objectives import get_objective, row_format
from tfpretrain.data.pipeline import (eval_dataset, make_rows, pack_corpus, row_indices,
                                      tokenize_documents, train_dataset)
from tfpretrain.data.sources import load_corpus
from tfpretrain.data.synthetic import generate_stories
from tfpretrain.data.tokenizers import EOS_ID, load_tokenizer, train_tokenizer
from tfpretrain.errors import UserError

DOCS = generate_stories(200, seed=7)


def test_story_corpus_is_deterministic_varied_and_story_like():
    stories = generate_stories(3000, seed=1)
    assert stories[:50] == generate_stories(50, seed=1)
    assert stories[:50] != generate_stories(50, seed=2)
    assert len(set(stories)) == len(stories)
    words = {w for s in stories for w in re.findall(r"[a-z'-]+", s.lower())}
    assert 900 <= len(words) <= 2500
    assert all('"' in s for s in stories[:200] if "said" in s)
    assert sum("said" in s or "asked" in s for s in stories) > 0.8 * len(stories)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "sentencepiece_unigram", "char", "byte",
                                  "wordpiece",  # bytelevel_bpe: ~16 s, under -m slow
                                  pytest.param("bytelevel_bpe", marks=pytest.mark.slow)])
def test_tokenizer_round_trip_save_and_reload(kind, tmp_path):
    tok = train_tokenizer(kind, DOCS, 400)
    text = DOCS[0] + " Zebra café ☃"
    ids = tok.encode(text)
    assert all(5 <= i < tok.vocabulary_size or i == 1 for i in ids)
    if kind == "wordpiece":  # BERT-style: lowercased, accents stripped, unseen pieces -> unk
        assert tok.decode(tok.encode("the dog, the cat.")) == "the dog, the cat."
    else:
        if kind != "char":  # char maps characters never seen in training to unk
            assert tok.decode(ids) == text
        assert tok.decode(tok.encode(DOCS[1])) == DOCS[1]
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.kind == kind and again.vocabulary_size == tok.vocabulary_size
    assert again.encode(text) == ids
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["special_tokens"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    # bits-per-byte needs the bytes each id stands for: they must add up to the text
    if kind in ("byte", "char", "bytelevel_bpe"):
        known = DOCS[1] + (" café" if kind != "char" else "")
        assert int(tok.token_bytes()[tok.encode(known)].sum()) == len(known.encode("utf-8"))


def test_packing_keeps_every_token_once_in_order_with_eos_between_documents():
    tok = train_tokenizer("byte", DOCS, 0)
    docs = DOCS[:20]
    stream = tokenize_documents(tok, docs)
    expected = []
    for d in docs:
        expected += [b + 5 for b in d.encode("utf-8")] + [EOS_ID]
    assert stream.tolist() == expected
    L = 32
    rows = make_rows(stream, get_objective("causal").row_format(L, "concat"))
    assert rows.shape == ((len(stream) - 1) // L, L + 1)
    x, y = rows[:, :-1], rows[:, 1:]
    assert x.reshape(-1).tolist() == stream[: rows.shape[0] * L].tolist()   # each once, in order
    assert y.reshape(-1).tolist() == stream[1: rows.shape[0] * L + 1].tolist()
    assert len(stream) - rows.shape[0] * L - 1 < L   # only the final partial row is lost


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = np.arange(50 * 9, dtype=np.int32).reshape(50, 9)
    unbroken = [b[0].numpy() for b in train_dataset(rows, 8, seed=3).take(20)]
    resumed = [b[0].numpy() for b in train_dataset(rows, 8, seed=3, start_step=13).take(7)]
    for a, b in zip(unbroken[13:], resumed):
        np.testing.assert_array_equal(a, b)
    other = [b[0].numpy() for b in train_dataset(rows, 8, seed=4).take(1)]
    assert not np.array_equal(unbroken[0], other[0])
    # each epoch is a permutation of all rows: 50 rows, batch 10 -> 5 steps per epoch
    ids = np.concatenate([row_indices(k, 10, 50, 3).numpy() for k in range(10)])
    assert sorted(ids[:50]) == list(range(50)) and sorted(ids[50:]) == list(range(50))
    assert not np.array_equal(ids[:50], ids[50:])  # reshuffled each epoch
    x, y, w = next(iter(train_dataset(rows, 8, seed=3)))
    assert x.shape == (8, 8) and y.shape == (8, 8) and w.shape == (8, 8)
    np.testing.assert_array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])


def test_eval_dataset_covers_all_rows_in_order():
    rows = np.arange(13 * 5, dtype=np.int32).reshape(13, 5)
    xs = np.concatenate([x.numpy() for x, _, _ in eval_dataset(rows, 4)])
    np.testing.assert_array_equal(xs, rows[:, :-1])


def test_file_sources_and_splits(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\nsecond doc\n\n\nthird doc\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "from jsonl one"}) + "\n\n")
        fh.write(json.dumps({"text": "from jsonl two"}) + "\n")
    (tmp_path / "c.txt").write_bytes(b"bad bytes \xff\xfe here")
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "*"), "val_fraction": 0.2})
    corpus = load_corpus(cfg.data, seed=0)
    docs = sorted(corpus.train + corpus.val)
    assert docs == sorted(["first doc line one\nline two", "second doc", "third doc",
                           "from jsonl one", "from jsonl two", "bad bytes \ufffd\ufffd here"])
    assert len(corpus.val) == 1
    tail = tiny_config(tmp_path, data={"path": str(tmp_path / "a.txt"), "split": "tail",
                                       "val_fraction": 0.3, "document_separator": "none"})
    c = load_corpus(tail.data, seed=0)
    assert c.train[0] + c.val[0] == "first doc line one\nline two\n\nsecond doc\n\n\nthird doc"
    assert len(c.val[0]) == pytest.approx(0.3 * 50, abs=2)


@pytest.mark.parametrize("content,msg", [
    (None, "data.path: no such file: "),
    ("  \n\n \t\n", "the corpus is empty"),
])
def test_missing_and_empty_corpus_are_user_errors(tmp_path, content, msg):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_text(content)
    cfg = tiny_config(tmp_path, data={"path": str(path)})
    with pytest.raises(UserError, match=msg):
        load_corpus(cfg.data, seed=0)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    cfg = tiny_config(tmp_path, data={"path": str(path)})
    with pytest.raises(UserError, match=r"d\.jsonl:2: malformed JSON"):
        load_corpus(cfg.data, seed=0)
    path.write_text('{"body": "ok"}\n')
    with pytest.raises(UserError, match=r"no field 'text' \(fields: body\)"):
        load_corpus(cfg.data, seed=0)


def test_pack_corpus_counts_and_too_small_val(tmp_path):
    tok = train_tokenizer("char", DOCS, 100)
    fmt = get_objective("causal").row_format(32, "concat")
    packed = pack_corpus(tok, DOCS[:150], DOCS[150:], fmt)
    assert packed.unigram_counts.sum() == packed.train_tokens
    assert packed.train_rows.dtype == np.int32 and packed.train_rows.shape[1] == 33
    with pytest.raises(UserError, match="validation split"):
        pack_corpus(tok, DOCS[:150], ["hi"], fmt)
    ds = tf.data.Dataset.from_tensor_slices(packed.val_rows)
    assert ds.cardinality().numpy() == len(packed.val_rows)


def test_parquet_source_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "story": ["one doc", "", "two doc"]}),
                   tmp_path / "d.parquet", row_group_size=1)
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "d.parquet"),
                                      "text_field": "story"})
    corpus = load_corpus(cfg.data, seed=0)
    assert sorted(corpus.train + corpus.val) == ["one doc", "two doc"]
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "d.parquet")})
    with pytest.raises(UserError, match=r"d\.parquet has no column 'text' \(columns: id, story\)"):
        load_corpus(cfg.data, seed=0)


@pytest.mark.parametrize("policy,expected", [
    ("replace", ["good one", "bad \ufffd\ufffd two", "good three"]),
    ("skip", ["good one", "good three"]),
])
def test_decode_error_policies(tmp_path, policy, expected):
    from tfpretrain.data.sources import read_documents

    path = tmp_path / "d.txt"
    path.write_bytes(b"good one\n\nbad \xff\xfe two\n\ngood three\n")
    cfg = tiny_config(tmp_path, data={"path": str(path), "on_decode_error": policy})
    docs, desc = read_documents(cfg.data, 0)
    assert docs == expected
    assert "2 undecodable byte(s)" in desc
    strict = tiny_config(tmp_path, data={"path": str(path), "on_decode_error": "strict"})
    with pytest.raises(UserError, match=r"d\.txt: invalid UTF-8 at byte offset 14"):
        read_documents(strict.data, 0)


def test_val_path_and_tfds_source(tmp_path):
    import tensorflow_datasets as tfds

    (tmp_path / "train.txt").write_text("a story\n\nanother story\n")
    (tmp_path / "val.jsonl").write_text('{"text": "held out"}\n')
    cfg = tiny_config(tmp_path, data={"path": str(tmp_path / "train.txt"),
                                      "val_path": str(tmp_path / "val.jsonl")})
    corpus = load_corpus(cfg.data, 0)
    assert corpus.train == ["a story", "another story"] and corpus.val == ["held out"]
    with tfds.testing.mock_data(num_examples=5):
        cfg = tiny_config(tmp_path, data={"path": "tfds://tiny_shakespeare",
                                          "val_path": "tfds://tiny_shakespeare@validation"})
        corpus = load_corpus(cfg.data, 0)
    assert len(corpus.train) >= 1 and len(corpus.val) >= 1
    assert all(isinstance(d, str) and d for d in corpus.train + corpus.val)
    assert "tfds://tiny_shakespeare" in corpus.description
    bad = tiny_config(tmp_path, data={"path": "tfds://no_such_dataset_xyz"})
    with pytest.raises(UserError, match="cannot load tfds://no_such_dataset_xyz"):
        load_corpus(bad.data, 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_document_mask_packed_document_equals_document_alone(arch, tmp_path):
    """With data.document_mask, a document packed after another gives the same logits as
    the document run alone (after its eos); without it, the earlier document leaks in."""
    from conftest import tiny_config
    from tfpretrain.objectives import build_model

    cfg = tiny_config(tmp_path, model={"arch": arch}, data={"document_mask": True})
    model = build_model(cfg, 300)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(5, 300, 11), rng.integers(5, 300, 9)
    packed = np.concatenate([doc_a, [EOS_ID], doc_b, [EOS_ID], rng.integers(5, 300, 4)])
    alone = np.concatenate([[EOS_ID], doc_b])
    start = len(doc_a)
    got = model(packed[None].astype(np.int32)).numpy()[0, start:start + len(alone)]
    want = model(alone[None].astype(np.int32)).numpy()[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    model.document_mask = False  # same weights, plain causal attention: doc_a leaks in
    leaky = model(packed[None].astype(np.int32)).numpy()[0, start:start + len(alone)]
    assert np.abs(leaky - want).max() > 1e-3


def test_token_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    from conftest import tiny_config
    from tfpretrain.data import cache as cache_mod
    from tfpretrain.data import pipeline

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    cfg = tiny_config(tmp_path, data={"path": str(corpus), "cache_dir": str(tmp_path / "c")})
    fmt = row_format(cfg)
    tok, packed, info = cache_mod.prepare(cfg, fmt, log=lambda m: None)
    assert not info["hit"] and Path(info["cache"], "meta.json").is_file()
    # second time: nothing is read or tokenized
    calls = []
    real = pipeline.tokenize_batches
    monkeypatch.setattr(pipeline, "tokenize_batches",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    tok2, packed2, info2 = cache_mod.prepare(cfg, fmt, log=lambda m: None)
    assert info2["hit"] and not calls
    np.testing.assert_array_equal(packed2.train_rows, packed.train_rows)
    np.testing.assert_array_equal(packed2.unigram_counts, packed.unigram_counts)
    assert tok2.encode(DOCS[0]) == tok.encode(DOCS[0])
    # a resumed run with its own (identical) tokenizer also hits; a different one does not
    tok.save(tmp_path / "run_tok")
    assert cache_mod.prepare(cfg, fmt, tmp_path / "run_tok", log=lambda m: None)[2]["hit"]
    other = train_tokenizer("char", DOCS, 100)
    other.save(tmp_path / "other_tok")
    assert not cache_mod.prepare(cfg, fmt, tmp_path / "other_tok",
                                 log=lambda m: None)[2]["hit"]
    # changing the source file re-reads and re-tokenizes
    with open(corpus, "a") as fh:
        fh.write("\n\nA brand new story about a zebra named Zed. " * 20)
    calls.clear()
    _, packed3, info3 = cache_mod.prepare(cfg, fmt, log=lambda m: None)
    assert not info3["hit"] and calls and packed3.train_tokens != packed.train_tokens
    # so does changing the context length (rows), but the tokenizer is reused
    cfg64 = tiny_config(tmp_path, data={"path": str(corpus), "cache_dir": str(tmp_path / "c")},
                        model={"sequence_length": 16})
    _, packed4, info4 = cache_mod.prepare(cfg64, row_format(cfg64), log=lambda m: None)
    assert not info4["hit"] and packed4.train_rows.shape[1] == 17
    assert len(list((tmp_path / "c").iterdir())) == 2  # two tokenizer keys (file changed)


def test_prepare_cli_prints_stats_then_hits_the_cache(tmp_path):
    from conftest import last_json_line, run_cli, tiny_raw, write_yaml

    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path))
    args = ("tfpretrain.data", "--config", str(cfg_path), "--cache-dir", str(tmp_path / "tc"))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    first = last_json_line(r.stdout)
    assert not first["cache_hit"] and first["train_tokens"] > 10_000
    assert 1.0 < first["bytes_per_token"] < 8 and 0 < first["vocabulary_coverage"] <= 1
    r = run_cli(*args)
    second = last_json_line(r.stdout)
    assert second["cache_hit"] and second["train_tokens"] == first["train_tokens"]


def test_hf_source_through_the_datasets_library(tmp_path):
    """hf:// goes through datasets.load_dataset (streaming); offline, NAME is a local folder
    of data files, loaded by the same call as a hub dataset."""
    pytest.importorskip("datasets")
    from conftest import tiny_config

    folder = tmp_path / "hfds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"story": d, "n": i}) + "\n"
                                                for i, d in enumerate(DOCS[:120])))
    (folder / "validation.jsonl").write_text("".join(json.dumps({"story": d}) + "\n"
                                                     for d in DOCS[120:140]))
    cfg = tiny_config(tmp_path, data={"path": f"hf://{folder}@train",
                                      "val_path": f"hf://{folder}@validation",
                                      "text_field": "story"})
    corpus = load_corpus(cfg.data, 0)
    assert corpus.train == DOCS[:120] and corpus.val == DOCS[120:140]
    bad = tiny_config(tmp_path, data={"path": f"hf://{folder}@train"})  # text_field "text"
    with pytest.raises(UserError, match=r"no column 'text' \(columns: story, n\)"):
        load_corpus(bad.data, 0)
    missing = tiny_config(tmp_path, data={"path": f"hf://{folder}@nosuchsplit"})
    with pytest.raises(UserError, match="cannot load hf://"):
        load_corpus(missing.data, 0)


def test_data_weights_mix_sources_by_bytes(tmp_path):
    from conftest import tiny_config
    from tfpretrain.config import ConfigError

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"alpha story {i} " + "aaa " * 30 for i in range(200)))
    b.write_text("\n\n".join(f"beta story {i} " + "bbb " * 30 for i in range(50)))
    cfg = tiny_config(tmp_path, data={"path": [str(a), str(b)], "weights": [1, 3]})
    corpus = load_corpus(cfg.data, 0)
    share_b = sum(len(d) for d in corpus.train if d.startswith("beta")) / \
        sum(len(d) for d in corpus.train)
    assert share_b == pytest.approx(0.75, abs=0.02)          # 1:3, although b is 4x smaller
    assert "mixed" in corpus.description
    assert all(d.startswith(("alpha", "beta")) for d in corpus.val)
    assert load_corpus(cfg.data, 0).train == corpus.train      # seeded
    with pytest.raises(ConfigError, match="one weight per entry"):
        tiny_config(tmp_path, data={"path": str(a), "weights": [1]})


def test_tokenizer_path_loads_existing_tokenizers(tmp_path):
    from tfpretrain.data.tokenizers import from_path

    sp = train_tokenizer("sentencepiece_unigram", DOCS, 400)
    sp.save(tmp_path / "run_tok")
    (tmp_path / "m.model").write_bytes(sp.proto)
    for p in (tmp_path / "run_tok", tmp_path / "m.model"):
        tok = from_path(p)
        assert tok.kind == "sentencepiece_unigram" and tok.encode(DOCS[3]) == sp.encode(DOCS[3])
    wp = train_tokenizer("wordpiece", DOCS, 300)
    (tmp_path / "vocab.txt").write_text("\n".join(wp.vocabulary) + "\n")
    assert from_path(tmp_path / "vocab.txt").encode("the dog") == wp.encode("the dog")
    import sentencepiece as spm

    foreign = tmp_path / "foreign.model"
    with open(foreign, "wb") as fh:  # Llama-style ids: unk 0, bos 1, eos 2
        spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS), model_writer=fh,
                                       vocab_size=200, minloglevel=2)
    with pytest.raises(UserError, match=r"needs \(0, 1, 2, 3, 4\)"):
        from_path(foreign)
    with pytest.raises(UserError, match="no such file"):
        from_path(tmp_path / "missing.model")
