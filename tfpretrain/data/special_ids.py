"""The special token ids every tokenizer kind shares (no TensorFlow import, so the
backend-neutral model code can use them): pad, unk, bos, eos, mask = 0..4."""
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
