"""The tokenizer of a keras_hub preset that tfpretrain did not make, moved to tfpretrain's ids.

tfpretrain's tokenizers share the special ids 0..4 (pad, unk, bos, eos, mask: see
special_ids.py), so packing, generation and export never branch on where a tokenizer came
from. A published model has its own: GPT-2's ``<|endoftext|>`` is 50256, Llama 2's
``<unk> <s> </s>`` are 0, 1, 2, Llama 3's ``<|begin_of_text|>`` is 128000, BERT's
``[PAD] [UNK] [CLS] [SEP] [MASK]`` are 0, 100, 101, 102, 103. ``convert``
returns the same tokenizer with tfpretrain's ids: the specials at 0..4 and every other token
in its old order from 5, so any text tokenizes to the same tokens. With it comes
``old_ids``: for each new id, the id it had (-1 for a special the source lacks), which is
how the preset's embedding rows follow (``training.warm_start``).

Three families: byte-level BPE (keras_hub's ``BytePairTokenizer``: GPT-2, Llama 3) becomes
a ``bytelevel_bpe`` tokenizer, SentencePiece (``SentencePieceTokenizer``: Llama 2 and the
llama2.c TinyStories models) a ``sentencepiece_*`` one whose model proto is rewritten
with the pieces reordered, WordPiece (``WordPieceTokenizer``: BERT, cased or uncased) a
``wordpiece`` one with [PAD] [UNK] [CLS] [SEP] [MASK] first. The source's other specials
(Llama 3's reserved and chat tokens) are dropped: plain text never produces them.
"""
from __future__ import annotations

import numpy as np

from tfpretrain.data.special_ids import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, UNK_ID
from tfpretrain.data.tokenizers import (BPE_SPECIALS, MASK_TOKEN, WORDPIECE_SPECIALS,
                                        ByteLevelBPETokenizer, SentencePieceTokenizer,
                                        Tokenizer, WordPieceTokenizer)
from tfpretrain.errors import UserError

MISSING = -1  # in old_ids: a new special the source had no token for


def convert(layer) -> tuple[Tokenizer, np.ndarray]:
    """A keras_hub tokenizer layer, or the bytes of a SentencePiece model (a Hugging Face
    checkpoint's ``tokenizer.model``) -> (tfpretrain tokenizer, old id of each new id)."""
    import keras_hub

    if isinstance(layer, bytes):
        return _sentencepiece(layer)
    if isinstance(layer, keras_hub.tokenizers.BytePairTokenizer):
        return _byte_pair(layer)
    if isinstance(layer, keras_hub.tokenizers.SentencePieceTokenizer):
        return _sentencepiece(bytes(layer.proto))
    if isinstance(layer, keras_hub.tokenizers.WordPieceTokenizer):
        return _word_piece(layer)
    raise UserError(f"model.init_from: the preset's tokenizer is a {type(layer).__name__}; "
                    "tfpretrain can start from byte-level BPE (GPT-2, Llama 3), "
                    "SentencePiece (Llama 2) and WordPiece (BERT) tokenizers")


def _word_piece(layer) -> tuple[Tokenizer, np.ndarray]:
    """BERT's vocab.txt ([PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103
    in the original models) with its five specials moved to 0..4."""
    vocabulary = list(layer.get_vocabulary())
    where = {t: i for i, t in enumerate(vocabulary)}
    missing = [t for t in WORDPIECE_SPECIALS if t not in where]
    if missing:
        raise UserError(f"model.init_from: the preset's WordPiece vocabulary lacks {missing}; "
                        f"tfpretrain needs {WORDPIECE_SPECIALS}")
    old_ids = [where[t] for t in WORDPIECE_SPECIALS]
    taken = set(old_ids)
    old_ids += [i for i in range(len(vocabulary)) if i not in taken]
    return (WordPieceTokenizer([vocabulary[i] for i in old_ids], bool(layer.lowercase)),
            np.array(old_ids))


def _byte_pair(layer) -> tuple[Tokenizer, np.ndarray]:
    from tfpretrain.compat import bytes_to_unicode

    vocabulary = dict(layer.vocabulary)
    missing = [c for c in bytes_to_unicode()[1] if c not in vocabulary]
    if missing:  # e.g. keras_hub reading a Llama 2 SentencePiece vocabulary as byte-level
        raise UserError(f"model.init_from: the preset's byte-level BPE vocabulary lacks "
                        f"{len(missing)} of the 256 byte characters, so it is not a "
                        "byte-level vocabulary (a SentencePiece one read as byte-level?); a "
                        "Hugging Face checkpoint of a SentencePiece model needs its "
                        "tokenizer.model beside config.json")
    specials = set(layer.special_tokens)
    ours = {BOS_ID: getattr(layer, "start_token", None), EOS_ID: getattr(layer, "end_token", None)}
    old_ids = [vocabulary.get(ours.get(i), MISSING) for i in range(NUM_SPECIAL)]
    rest = sorted((i, t) for t, i in vocabulary.items()
                  if t not in specials and t not in BPE_SPECIALS)
    new_vocabulary = {t: i for i, t in enumerate(BPE_SPECIALS)}
    for i, t in rest:
        new_vocabulary[t] = len(new_vocabulary)
        old_ids.append(i)
    return ByteLevelBPETokenizer(new_vocabulary, list(layer.merges)), np.array(old_ids)


def _sentencepiece(proto: bytes) -> tuple[Tokenizer, np.ndarray]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    old = pb.ModelProto()
    old.ParseFromString(proto)
    spec, Piece = old.trainer_spec, pb.ModelProto.SentencePiece
    by_role = {PAD_ID: spec.pad_id, UNK_ID: spec.unk_id, BOS_ID: spec.bos_id,
               EOS_ID: spec.eos_id}
    masks = [i for i, p in enumerate(old.pieces) if p.piece == MASK_TOKEN]
    by_role[NUM_SPECIAL - 1] = masks[0] if masks else MISSING
    if by_role[UNK_ID] < 0:
        raise UserError("model.init_from: the preset's SentencePiece model has no unknown "
                        "piece; tfpretrain needs one")
    defaults = {PAD_ID: ("<pad>", Piece.CONTROL), UNK_ID: ("<unk>", Piece.UNKNOWN),
                BOS_ID: ("<s>", Piece.CONTROL), EOS_ID: ("</s>", Piece.CONTROL),
                NUM_SPECIAL - 1: (MASK_TOKEN, Piece.USER_DEFINED)}
    new = pb.ModelProto()
    new.CopyFrom(old)
    del new.pieces[:]
    old_ids = []
    for role in range(NUM_SPECIAL):
        i = by_role[role] if 0 <= by_role[role] < len(old.pieces) else MISSING
        text, kind = defaults[role]
        piece = new.pieces.add()
        piece.piece = old.pieces[i].piece if i != MISSING else text
        piece.type, piece.score = kind, 0.0
        old_ids.append(i)
    taken_ids, taken_pieces = set(old_ids), {p.piece for p in new.pieces}
    for i, p in enumerate(old.pieces):
        if i not in taken_ids and p.piece not in taken_pieces:
            new.pieces.add().CopyFrom(p)
            old_ids.append(i)
    spec = new.trainer_spec
    spec.pad_id, spec.unk_id, spec.bos_id, spec.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    spec.pad_piece, spec.unk_piece = new.pieces[PAD_ID].piece, new.pieces[UNK_ID].piece
    spec.bos_piece, spec.eos_piece = new.pieces[BOS_ID].piece, new.pieces[EOS_ID].piece
    kind = "sentencepiece_bpe" if spec.model_type == spec.BPE else "sentencepiece_unigram"
    return SentencePieceTokenizer(new.SerializeToString(), kind), np.array(old_ids)


def moved_rows(table: np.ndarray, old_ids: np.ndarray, axis: int = 0) -> np.ndarray:
    """``table`` (an embedding [vocab, hidden], or an output head with ``axis=1``) with its
    rows in the new ids' order; a special the source lacked gets the mean row, which keeps
    its logit near the average one instead of dominating (a zero row's logit 0 would, in
    models whose logits are mostly negative)."""
    table = np.asarray(table)
    mean = table.mean(axis=axis, keepdims=True)
    picked = np.take(table, np.maximum(old_ids, 0), axis=axis)
    missing = (old_ids == MISSING).reshape([-1 if a == axis else 1 for a in range(table.ndim)])
    return np.where(missing, mean, picked).astype(table.dtype)
