"""Check an exported SavedModel the way a server sees it. Run as a script, in a fresh process:

    python tfpretrain/serving/check.py SAVED_MODEL REQUEST.json OUT_DIR
    python tfpretrain/serving/check.py --wait    # imports first, then reads the three
                                                 # arguments as one JSON list on stdin

It imports only tensorflow and tensorflow_text (never tfpretrain or keras_hub), so
it proves the model loads where only TF Serving's ops exist. It:
- scans every op of every function in saved_model.pb: an op must be a TF core op
  (``tf.raw_ops``) or one that tensorflow_text registers, and never Xla*, a Python
  function or a file read/write;
- calls the ``logits`` signature on REQUEST["token_ids"] (saved to OUT_DIR/logits.npy) and
  the ``generate`` signature (masked LMs: ``fill_mask``) on REQUEST["prompts"] (token ids
  to OUT_DIR/generate.npy);
- reads the `serve` MetaGraphDef's SignatureDefs from saved_model.pb (what TF Serving and
  ``saved_model_cli show`` see);
- prints one JSON line: signatures and their input names, SignatureDef keys, op count,
  forbidden ops.

``--wait`` lets the exporter start this process before it saves the model, so that
TensorFlow's import (seconds) overlaps the save instead of following it.
"""
import json
import sys

import numpy as np
import tensorflow as tf

FORBIDDEN_PREFIXES = ("Xla", "_Xla")
FORBIDDEN = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "ReadFile", "WriteFile",
             "ImmutableConst", "MatchingFiles"}


def read_saved_model(path):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(f"{path}/saved_model.pb", "rb") as fh:
        sm.ParseFromString(fh.read())
    return sm


def serving_signature_defs(path):
    """The SignatureDef keys of the `serve` MetaGraphDef: what TF Serving and
    `saved_model_cli show --all` read, independently of the Python loader."""
    for mg in read_saved_model(path).meta_graphs:
        if "serve" in mg.meta_info_def.tags:
            return sorted(k for k in mg.signature_def.keys() if not k.startswith("__"))
    return []


def graph_ops(path):
    sm = read_saved_model(path)
    ops = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


def scan_ops(path):
    """(all ops, ops not allowed)."""
    from tensorflow.python.framework import op_def_registry

    core = set(dir(tf.raw_ops))
    ops = graph_ops(path)
    import tensorflow_text  # noqa: F401  registers the TF Text / SentencePiece ops

    bad = set()
    for op in ops:
        if op.startswith(FORBIDDEN_PREFIXES) or op in FORBIDDEN:
            bad.add(op)
        elif op not in core and op_def_registry.get(op) is None:
            bad.add(op)
    return ops, bad


def main(path, request_path, out_dir):
    request = json.loads(open(request_path).read())
    ops, bad = scan_ops(path)
    model = tf.saved_model.load(path)
    sigs = {name: sorted(fn.structured_input_signature[1].keys())
            for name, fn in model.signatures.items()}
    ids = tf.constant(np.array(request["token_ids"], np.int32))
    np.save(f"{out_dir}/logits.npy", model.signatures["logits"](token_ids=ids)["logits"].numpy())
    if "generate" in model.signatures:
        gen = model.signatures["generate"](prompts=tf.constant(request["prompts"]))
    else:
        gen = model.signatures["fill_mask"](text=tf.constant(request["prompts"]))
    np.save(f"{out_dir}/generate.npy", gen["token_ids"].numpy())
    # tensorflow_text itself pulls in tf.keras; what must never be needed is our code or
    # keras_hub (the model must be self-contained)
    ours = ("keras_hub", "keras_nlp", "tfpretrain")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ours)
    print(json.dumps({"signatures": sigs, "signature_defs": serving_signature_defs(path),
                      "num_ops": len(ops), "forbidden_ops": sorted(bad),
                      "text": [t.decode("utf-8", "replace") for t in gen["text"].numpy()],
                      "unexpected_modules": loaded[:5]}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--wait"]:
        __import__("tensorflow_text")  # imported while the exporter still saves
        line = sys.stdin.readline()
        if not line.strip():  # stdin closed: the exporter is gone, nothing to check
            sys.exit(0)
        main(*json.loads(line))
    else:
        main(*sys.argv[1:4])
