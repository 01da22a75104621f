"""Export a run: a SavedModel in TF Serving's layout ``<dir>/<name>/<version>/`` (default),
a keras_hub preset, or a Hugging Face transformers folder.

    python -m tfpretrain.export --run-dir runs/default [--out saved_models/NAME] [--version N]
                                [--format saved_model|keras|hf] [--overwrite] [--no-validate]

The SavedModel's signatures are listed in ``tfpretrain.serving.saved_model``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by tfpretrain.fit")
    p.add_argument("--out", help="model folder (default: <export.dir>/<run name>)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--format", choices=("saved_model", "keras", "hf"), default="saved_model",
                   help="saved_model: TF Serving layout (default); keras: a keras_hub preset "
                        "that keras_hub.models.CausalLM.from_preset() loads; hf: a Hugging "
                        "Face transformers folder")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the fresh-process reload, parity check and op scan")
    return p


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    args = parser().parse_args(argv)
    if args.version is not None and args.version < 1:
        raise UserError(f"--version must be >= 1. Received: {args.version}")
    from tfpretrain.serving.presets import export_hf, export_keras_preset
    from tfpretrain.serving.saved_model import export_saved_model
    from tfpretrain.training.runfolder import load_run

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    cfg, tokenizer, model = load_run(run_dir)
    if args.format in ("keras", "hf"):
        fn = export_keras_preset if args.format == "keras" else export_hf
        print(fn(model, tokenizer, cfg, run_dir, out, args.overwrite))
        return 0
    print(export_saved_model(model, tokenizer, cfg, run_dir, out, args.version,
                             args.overwrite, False if args.no_validate else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
