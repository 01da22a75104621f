"""``tfpretrain <command> [args]``: one console command over the ``python -m tfpretrain.<cmd>``
entry points (which stay). ``tfpretrain <command> --help`` shows a command's options.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int, one line of help)
COMMANDS = {
    "fit": ("tfpretrain.fit", "pretrain a model end to end (the main job)"),
    "generate": ("tfpretrain.generate", "sample text (or fill [MASK]s) from a run"),
    "evaluate": ("tfpretrain.evaluate", "loss, perplexity, bits per byte on any text"),
    "export": ("tfpretrain.export", "SavedModel for TF Serving, keras_hub or HF preset"),
    "tune": ("tfpretrain.tune", "KerasTuner search over config keys"),
    "scaling": ("tfpretrain.scaling", "IsoFLOP sweep: your compute-optimal size and tokens"),
    "runs": ("tfpretrain.runs", "compare run folders (table, plot)"),
    "data": ("tfpretrain.data.__main__", "prepare the token cache of a config"),
    "data_service": ("tfpretrain.data_service", "a tf.data service feeder for `data.service`"),
    "estimate": ("tfpretrain.estimate", "FLOPs, hours and dollars of a run or search"),
    "lr_find": ("tfpretrain.lr_find", "learning-rate range test: a suggested peak rate"),
    "schedule": ("tfpretrain.schedule", "the learning rate of every step (table, PNG)"),
    "synth": ("tfpretrain.synth", "synthetic data: stories, augment, bootstrap, evolve, "
              "dedup, distill, report"),
    "bench": ("tfpretrain.bench", "benchmarks: fit, generate, data, optim, synth, gpu"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: tfpretrain <command> [args]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`tfpretrain <command> --help` shows a command's options; each is also "
              "`python -m tfpretrain.<command>`.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}.\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
