"""Tokenizers trained on the corpus, with TF-graph tokenize/detokenize.

Every kind shares the same special ids, so packing, generation and export never branch on
the kind: ``pad=0, unk=1, bos=2, eos=3, mask=4``; real tokens start at 5. ``eos`` separates
documents in packed rows and ends generation; masked-LM rows are ``bos ... eos`` (BERT's
[CLS] ... [SEP]) and ``mask`` is the [MASK] token. SentencePiece and WordPiece tokenizers
turn the literal text ``[MASK]`` into the mask id (for fill-mask prompts).

Kinds:
- ``sentencepiece_bpe`` / ``sentencepiece_unigram``: trained with the sentencepiece library,
  run in the graph by tensorflow_text's SentencePiece ops (which TF Serving builds ship).
- ``wordpiece``: BERT's WordPiece (lowercased, accents stripped, split on whitespace and
  punctuation), trained with Hugging Face ``tokenizers`` (a keras_hub dependency), run in the
  graph by keras_hub's WordPieceTokenizer (TF Text ops).
- ``bytelevel_bpe``: GPT-2-style byte-level BPE (no unknown tokens; text round-trips
  exactly), trained with Hugging Face ``tokenizers``, run in the graph by keras_hub's
  BytePairTokenizer.
- ``char``: one id per character (nanoGPT's shakespeare_char), TF core ops only.
- ``byte``: one id per UTF-8 byte (5 special + 256 ids), TF core ops only; needs no training.

A tokenizer is saved as ``<dir>/tokenizer.json`` (kind, ids, vocabulary) plus
``<dir>/spm.model`` for SentencePiece kinds, ``<dir>/vocab.txt`` for WordPiece,
``<dir>/vocab.json`` + ``<dir>/merges.txt`` for byte-level BPE.
"""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf

from tfpretrain.data.special_ids import (BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL,  # noqa: F401
                                         PAD_ID, UNK_ID)
from tfpretrain.errors import UserError

SPECIAL_TOKENS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "mask": MASK_ID}
MASK_TOKEN = "[MASK]"
BYTE_VOCABULARY_SIZE = NUM_SPECIAL + 256  # the byte tokenizer's fixed vocabulary
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", MASK_TOKEN]  # ids 0..4


class Tokenizer:
    """Base: subclasses implement ``_tokenize`` (ragged ids) and ``pieces``."""

    kind: str = ""

    # -- graph ops (usable inside tf.data, tf.function and SavedModels) --
    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """``texts``: string tensor [batch] -> ragged int32 [batch, None]."""
        texts = tf.convert_to_tensor(texts, tf.string)
        ids = self._tokenize(tf.reshape(texts, [-1]))
        if not isinstance(ids, tf.RaggedTensor):  # keras_hub may densify equal-length rows
            ids = tf.RaggedTensor.from_tensor(ids)
        return ids

    def detokenize(self, ids) -> tf.Tensor:
        """int ids [batch, None] (dense or ragged) -> strings [batch]; specials dropped."""
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(tf.convert_to_tensor(ids, tf.int32))
        ids = tf.cast(ids, tf.int32)
        ids = tf.ragged.boolean_mask(ids, ids >= NUM_SPECIAL)
        return self._detokenize(ids)

    def _detokenize(self, ids: tf.RaggedTensor) -> tf.Tensor:
        table = tf.constant(self.pieces())
        return tf.strings.reduce_join(tf.gather(table, ids), axis=-1)

    # -- eager conveniences --
    def encode(self, text: str) -> list[int]:
        return self.tokenize(tf.constant([text]))[0].numpy().tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        return self.detokenize(tf.ragged.constant([ids], dtype=tf.int32))[0].numpy().decode(
            "utf-8", errors="replace")

    # -- metadata --
    @property
    def vocabulary_size(self) -> int:
        return len(self.pieces())

    def pieces(self) -> list:
        """The text of each id (bytes); specials map to b''."""
        raise NotImplementedError

    def word_starts(self) -> np.ndarray:
        """bool [V]: the id begins a word (specials, pieces starting with a space, and
        WordPiece pieces without ``##``); used by whole-word masking."""
        starts = np.array([p[:1] in (b" ", b"") or not p[:1].isalnum() for p in self.pieces()])
        starts[:NUM_SPECIAL] = True
        return starts

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for; eos counts 1 (the document separator)."""
        lengths = np.array([len(p) for p in self.pieces()], dtype=np.int64)
        lengths[EOS_ID] = 1
        return lengths

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocabulary_size": self.vocabulary_size,
                "special_tokens": SPECIAL_TOKENS, **self._meta()}
        (directory / "tokenizer.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        self._save_assets(directory)

    def _meta(self) -> dict:
        return {}

    def _save_assets(self, directory: Path) -> None:
        pass


class ByteTokenizer(Tokenizer):
    kind = "byte"

    def _tokenize(self, texts):
        split = tf.strings.bytes_split(texts)
        flat = tf.reshape(tf.io.decode_raw(split.flat_values, tf.uint8), [-1])
        return split.with_flat_values(tf.cast(flat, tf.int32) + NUM_SPECIAL)

    def pieces(self):
        return [b""] * NUM_SPECIAL + [bytes([b]) for b in range(256)]


class CharTokenizer(Tokenizer):
    """One id per Unicode character; characters outside the vocabulary map to unk."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        keys = tf.constant([ord(c) for c in self.chars], tf.int32)
        values = tf.range(NUM_SPECIAL, NUM_SPECIAL + len(self.chars), dtype=tf.int32)
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=UNK_ID)

    @classmethod
    def train(cls, texts: Iterable[str], vocabulary_size: int) -> "CharTokenizer":
        counts = Counter()
        for t in texts:
            counts.update(t)
        keep = vocabulary_size - NUM_SPECIAL
        chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]]
        return cls(sorted(chars))

    def _tokenize(self, texts):
        cps = tf.strings.unicode_decode(texts, "UTF-8", errors="replace")
        return cps.with_flat_values(self._table.lookup(cps.flat_values))

    def pieces(self):
        return [b""] * NUM_SPECIAL + [c.encode("utf-8") for c in self.chars]

    def _meta(self):
        return {"chars": "".join(self.chars)}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, proto: bytes, kind: str):
        import tensorflow_text as tf_text

        self.kind = kind
        self.proto = proto
        self._sp = tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32)
        self._pieces = None

    @classmethod
    def train(cls, texts: Iterable[str], vocabulary_size: int, kind: str,
              character_coverage: float = 0.9995, byte_fallback: bool = True,
              seed: int = 0) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        def sentences():
            # SentencePiece skips "sentences" longer than max_sentence_length: feed lines.
            for t in texts:
                for line in t.split("\n"):
                    if line.strip():
                        yield line[:8192]

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=model,
                model_type="bpe" if kind == "sentencepiece_bpe" else "unigram",
                vocab_size=vocabulary_size, hard_vocab_limit=False,
                character_coverage=character_coverage, byte_fallback=byte_fallback,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                user_defined_symbols=[MASK_TOKEN],  # id 4 = MASK_ID
                max_sentence_length=1 << 15, num_threads=2, minloglevel=2,
                train_extremely_large_corpus=False)
        except RuntimeError as exc:
            need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(exc))
            if need:
                raise UserError(
                    f"`tokenizer.vocabulary_size` must be at least {need.group(2)} for this "
                    f"text (its characters{' plus 256 byte-fallback ids' if byte_fallback else ''}"
                    f" and 5 specials). Received: {vocabulary_size}. Raise it"
                    f"{', or set `tokenizer.byte_fallback: false`' if byte_fallback else ''}"
                    ".") from None
            raise UserError(f"tokenizer: SentencePiece training failed: {exc}. "
                            f"Try another `tokenizer.vocabulary_size` (was "
                            f"{vocabulary_size}) or more text.") from None
        return cls(model.getvalue(), kind)

    def _tokenize(self, texts):
        return self._sp.tokenize(texts)

    def _detokenize(self, ids):
        return self._sp.detokenize(ids)

    def pieces(self):
        if self._pieces is None:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_proto=self.proto)
            out = []
            for i in range(sp.get_piece_size()):
                piece = sp.id_to_piece(i)
                if sp.is_control(i) or sp.is_unknown(i) or i == MASK_ID:
                    out.append(b"")
                elif sp.is_byte(i):
                    out.append(bytes([int(piece[3:5], 16)]))
                else:
                    out.append(piece.replace("\u2581", " ").encode("utf-8"))
            self._pieces = out
        return self._pieces

    def _save_assets(self, directory):
        (Path(directory) / "spm.model").write_bytes(self.proto)


class GraphLayerTokenizer(Tokenizer):
    """A keras_hub tokenizer layer (``self.layer``) always run on its TF-graph path: its
    eager path is pure Python, returns lists and can differ from the graph path."""

    layer = None

    def _graph(self, name, x):
        if not tf.executing_eagerly():
            return getattr(self.layer, name)(x)
        fns = self.__dict__.setdefault("_eager_fns", {})
        if name not in fns:
            fns[name] = tf.function(getattr(self.layer, name), reduce_retracing=True)
        return fns[name](x)


class WordPieceTokenizer(GraphLayerTokenizer):
    """BERT WordPiece: ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK] (= pad/unk/bos/eos/mask).
    ``lowercase``: lowercase and strip accents first, as BERT's uncased models do (the ones
    tfpretrain trains are); a cased published vocabulary (bert_base_en) keeps both."""

    kind = "wordpiece"

    def __init__(self, vocabulary: list[str], lowercase: bool = True):
        import keras_hub

        if vocabulary[:NUM_SPECIAL] != WORDPIECE_SPECIALS:
            raise UserError(f"WordPiece vocabulary must start with {WORDPIECE_SPECIALS}. "
                            f"Received: {vocabulary[:NUM_SPECIAL]}")
        self.vocabulary, self.lowercase = list(vocabulary), bool(lowercase)
        self.layer = keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=self.vocabulary, lowercase=self.lowercase,
            strip_accents=self.lowercase, oov_token="[UNK]",
            special_tokens=WORDPIECE_SPECIALS[:1] + WORDPIECE_SPECIALS[2:],
            special_tokens_in_strings=True, dtype="int32")

    @classmethod
    def train(cls, texts: Iterable[str], vocabulary_size: int) -> "WordPieceTokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        # the same normalization and splitting as keras_hub's WordPieceTokenizer below
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True,
                                                    clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocabulary_size, special_tokens=WORDPIECE_SPECIALS,
            continuing_subword_prefix="##", show_progress=False)
        tok.train_from_iterator(texts, trainer)
        vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        return cls(vocab)

    def _tokenize(self, texts):
        return self._graph("tokenize", texts)

    def _detokenize(self, ids):
        text = self._graph("detokenize", ids)
        return tf.strings.regex_replace(text, r" ([.,!?;:])", r"\1")

    def pieces(self):
        return [b""] * NUM_SPECIAL + [
            (p[2:] if p.startswith("##") else " " + p).encode("utf-8")
            for p in self.vocabulary[NUM_SPECIAL:]]

    def _meta(self):
        return {"lowercase": self.lowercase}

    def _save_assets(self, directory):
        (Path(directory) / "vocab.txt").write_text("\n".join(self.vocabulary) + "\n",
                                                   encoding="utf-8")


BPE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", MASK_TOKEN]  # ids 0..4


class ByteLevelBPETokenizer(GraphLayerTokenizer):
    """GPT-2-style byte-level BPE: ids 0..4 are <pad> <unk> <s> </s> [MASK]."""

    kind = "bytelevel_bpe"

    def __init__(self, vocabulary: dict, merges: list[str]):
        import keras_hub

        if [t for t, _ in sorted(vocabulary.items(), key=lambda kv: kv[1])][:NUM_SPECIAL] \
                != BPE_SPECIALS:
            raise UserError(f"byte-level BPE vocabulary must start with {BPE_SPECIALS}")
        self.vocabulary, self.merges = dict(vocabulary), list(merges)
        self.layer = keras_hub.tokenizers.BytePairTokenizer(
            vocabulary=self.vocabulary, merges=self.merges, unsplittable_tokens=BPE_SPECIALS,
            dtype="int32")

    @classmethod
    def train(cls, texts: Iterable[str], vocabulary_size: int) -> "ByteLevelBPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocabulary_size, special_tokens=BPE_SPECIALS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        model = json.loads(tok.to_str())["model"]
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        return cls(model["vocab"], merges)

    def _tokenize(self, texts):
        return self._graph("tokenize", texts)

    def _detokenize(self, ids):
        return self._graph("detokenize", ids)

    def pieces(self):
        from tfpretrain.compat import bytes_to_unicode

        bs, cs = bytes_to_unicode()  # byte strings and the characters standing for them
        decode = dict(zip(cs, bs))
        out = [b""] * len(self.vocabulary)
        for token, i in self.vocabulary.items():
            if i >= NUM_SPECIAL:
                out[i] = b"".join(decode.get(ch, b"?") for ch in token)
        return out

    def _save_assets(self, directory):
        (Path(directory) / "vocab.json").write_text(json.dumps(self.vocabulary,
                                                               ensure_ascii=False))
        (Path(directory) / "merges.txt").write_text("\n".join(self.merges) + "\n",
                                                    encoding="utf-8")


def train_tokenizer(kind: str, texts: Iterable[str], vocabulary_size: int,
                    character_coverage: float = 0.9995, byte_fallback: bool = True,
                    train_bytes: int = 50_000_000, seed: int = 0) -> Tokenizer:
    """Train ``kind`` on at most ``train_bytes`` of ``texts`` (the training split)."""
    if kind == "byte":
        return ByteTokenizer()
    sample, total = [], 0
    for t in texts:
        if total >= train_bytes:
            break
        sample.append(t[: max(0, train_bytes - total)])
        total += len(sample[-1])
    if kind == "char":
        return CharTokenizer.train(sample, vocabulary_size)
    if kind == "wordpiece":
        return WordPieceTokenizer.train(sample, vocabulary_size)
    if kind == "bytelevel_bpe":
        return ByteLevelBPETokenizer.train(sample, vocabulary_size)
    if kind in ("sentencepiece_bpe", "sentencepiece_unigram"):
        return SentencePieceTokenizer.train(sample, vocabulary_size, kind,
                                            character_coverage, byte_fallback, seed)
    raise UserError(f"`tokenizer.kind` must be one of sentencepiece_bpe, "
                    f"sentencepiece_unigram, wordpiece, bytelevel_bpe, char, byte. "
                    f"Received: {kind!r}")


def from_path(path) -> Tokenizer:
    """An existing tokenizer (``tokenizer.path``): a tfpretrain tokenizer folder, a
    SentencePiece model or a WordPiece vocab.txt, checked against our special ids."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_tokenizer(path)
    if not path.is_file():
        raise UserError(f"tokenizer.path: no such file or folder: {path}")
    if path.suffix == ".txt":
        vocab = path.read_text(encoding="utf-8").splitlines()
        if vocab[:NUM_SPECIAL] != WORDPIECE_SPECIALS:
            raise UserError(f"tokenizer.path: {path} must start with {WORDPIECE_SPECIALS} "
                            f"(ids 0-4). Found: {vocab[:NUM_SPECIAL]}")
        return WordPieceTokenizer(vocab)
    import sentencepiece as spm

    proto = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception:
        raise UserError(f"tokenizer.path: {path} is not a SentencePiece model, a vocab.txt "
                        "or a tokenizer folder") from None
    ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.piece_to_id(MASK_TOKEN))
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID):
        raise UserError(f"tokenizer.path: {path} has pad/unk/bos/eos/[MASK] ids {ids}; "
                        f"tfpretrain needs (0, 1, 2, 3, 4). Retrain it with pad_id=0 unk_id=1 "
                        "bos_id=2 eos_id=3 user_defined_symbols=[MASK], or let tfpretrain "
                        "train one (unset tokenizer.path)")
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    kind = "sentencepiece_bpe" if model.trainer_spec.model_type == model.trainer_spec.BPE \
        else "sentencepiece_unigram"
    return SentencePieceTokenizer(proto, kind)


def same_tokenizer(a, b) -> bool:
    """Whether the tokenizers at two paths (``from_path``) map text to the same ids (kind
    and every piece)."""
    ta, tb = from_path(a), from_path(b)
    return ta.kind == tb.kind and list(ta.pieces()) == list(tb.pieces()) and \
        getattr(ta, "lowercase", None) == getattr(tb, "lowercase", None)


def train_from_config(cfg, texts: Iterable[str]) -> Tokenizer:
    """``train_tokenizer`` with the settings of a full Config (tokenizer section + seed), or
    the tokenizer at ``tokenizer.path`` (``texts``, possibly lazy, is then not read)."""
    tc = cfg.tokenizer
    if tc.path:
        return from_path(tc.path)
    return train_tokenizer(resolved_kind(cfg), texts, tc.vocabulary_size, tc.character_coverage,
                           tc.byte_fallback, tc.train_bytes, cfg.train.seed)


def resolved_kind(cfg) -> str:
    """``tokenizer.kind: auto`` -> wordpiece for BERT, sentencepiece_bpe otherwise."""
    if cfg.tokenizer.kind != "auto":
        return cfg.tokenizer.kind
    return "wordpiece" if cfg.model.arch == "bert" else "sentencepiece_bpe"


# the files a saved tokenizer has beside tokenizer.json, per kind (``_save_assets``)
ASSET_FILES = {"sentencepiece_bpe": ("spm.model",), "sentencepiece_unigram": ("spm.model",),
               "wordpiece": ("vocab.txt",), "bytelevel_bpe": ("vocab.json", "merges.txt")}


def load_tokenizer(directory: Path) -> Tokenizer:
    directory = Path(directory)
    meta_path = directory / "tokenizer.json"
    if not meta_path.is_file():
        raise UserError(f"no tokenizer in {directory} (expected {meta_path.name}); "
                        "is this a tfpretrain run folder?")
    meta = json.loads(meta_path.read_text())
    kind = meta["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(meta["chars"]))
    if kind == "wordpiece":
        return WordPieceTokenizer(
            (directory / "vocab.txt").read_text(encoding="utf-8").splitlines(),
            meta.get("lowercase", True))
    if kind == "bytelevel_bpe":
        return ByteLevelBPETokenizer(
            json.loads((directory / "vocab.json").read_text(encoding="utf-8")),
            (directory / "merges.txt").read_text(encoding="utf-8").splitlines())
    return SentencePieceTokenizer((directory / "spm.model").read_bytes(), kind)
