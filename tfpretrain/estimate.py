"""What a training run (or a whole search) will cost, before you pay for it.

    python -m tfpretrain.estimate [--config NAME|PATH] [--set KEY=VALUE ...]
        [--params 27.5M] [--tokens 4B] [--device l4] [--precision mixed_bfloat16]
        [--mfu 0.08 | --tokens-per-second 60000] [--price-per-hour 0.70]
        [--tune tune] [--measure]

Training FLOPs = tokens x FLOPs per token (6 N + 12 L H T, nanoGPT's and PaLM's
convention, N without a learned position table). For each device of the table (datasheet
dense peaks, typical on-demand prices) the hours and dollars at the given MFU (default 0.30,
an assumption: say `--mfu`, or give a measured `--tokens-per-second` for `--device`). The
model's shape comes from the config (default: the packaged default config); `--params` and
`--tokens` override its parameter count and token budget (train.steps x batch x context).
`--measure` times a short run of the config on this machine (needs TensorFlow) and adds
the CPU/GPU it runs on with the measured MFU. `--tune` adds the cost of the config's
KerasTuner search (max_trials x steps_per_trial at the config's batch and size).

smolGPT's headline run (27.5M parameters, 4B tokens, one L4 at ~60k tokens/s, $0.70/h):

    python -m tfpretrain.estimate --config tinystories-27m --params 27.5M --tokens 4B \
        --device l4 --tokens-per-second 60000

The last line of stdout is one JSON object (flops, hours, cost_usd, chinchilla_tokens,
rows).
"""
from __future__ import annotations

import argparse
import json
import sys

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow

SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def count(text: str) -> float:
    """27.5M -> 27_500_000; 4B -> 4e9; 131k; 1e9; plain numbers."""
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    try:
        if t and t[-1] in SUFFIXES:
            return float(t[:-1]) * SUFFIXES[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count like 27.5M, 4B or 131k, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name or a YAML file (default: "
                                    "the default config)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--params", type=count, help="parameter count (default: from the config)")
    p.add_argument("--tokens", type=count, help="training tokens (default: train.steps x "
                                                "batch_size x sequence_length)")
    p.add_argument("--device", help="the device --mfu / --tokens-per-second / "
                                    "--price-per-hour describe (default: every device)")
    p.add_argument("--precision", choices=("mixed_bfloat16", "float32", "mixed_float16"),
                   help="peak to compare against (default: the config's train.precision; "
                        "auto = bf16 where the device has it)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--mfu", type=float, help="model FLOPs utilization, 0-1 (default "
                                                 "0.30, an assumption)")
    speed.add_argument("--tokens-per-second", type=count,
                       help="measured throughput on --device (MFU derived from it)")
    p.add_argument("--price-per-hour", type=float, help="US$ per device-hour on --device")
    p.add_argument("--tune", metavar="CONFIG", help="also cost this tune config's search")
    p.add_argument("--measure", action="store_true",
                   help="time a short run of the config here and add this machine's row")
    return p


def plan(cfg, params: float | None = None, tokens: float | None = None) -> dict:
    """Parameters, FLOPs per token and tokens of a config (overridable)."""
    from tfpretrain.training.budget import chinchilla_tokens, model_flops_per_token
    from tfpretrain.training.runtime import estimated_params

    vocab = cfg.tokenizer.vocabulary_size
    n = int(params) if params else estimated_params(cfg, vocab)
    tokens = int(tokens) if tokens else (cfg.train.steps * cfg.train.batch_size
                                         * cfg.model.sequence_length)
    flops_per_token = model_flops_per_token(cfg, n, vocab)
    return {"params": n, "tokens": tokens, "flops_per_token": flops_per_token,
            "flops": float(flops_per_token) * tokens, "chinchilla_tokens": chinchilla_tokens(n)}


def rows(info: dict, precision: str, args) -> list:
    """One projection per device; the named --device gets the given speed and price."""
    from tfpretrain.hardware import DEVICES, get_device
    from tfpretrain.training.budget import project

    chosen = get_device(args.device) if args.device else None
    out = []
    for device in DEVICES.values():
        mine = chosen is not None and device.name == chosen.name
        out.append(project(device, precision, info["tokens"], info["flops_per_token"],
                           mfu=args.mfu if mine or not args.device else None,
                           tokens_per_second=args.tokens_per_second if mine else None,
                           price_per_hour=args.price_per_hour if mine else None))
    if chosen is not None and chosen.name not in DEVICES:  # cpu
        out.append(project(chosen, precision, info["tokens"], info["flops_per_token"],
                           mfu=args.mfu, tokens_per_second=args.tokens_per_second,
                           price_per_hour=args.price_per_hour))
    return out


def measured_row(cfg, info: dict, precision: str):
    """This machine, at the tokens/s of a short timed run of the config."""
    from tfpretrain.hardware import detect
    from tfpretrain.training.budget import project, run_price
    from tfpretrain.training.runtime import measure_tokens_per_second, resolve_precision

    tokens_per_second = measure_tokens_per_second(cfg)
    device = detect()
    if precision == "auto":  # what the timed run used on this machine
        precision = resolve_precision(cfg, cfg.tokenizer.vocabulary_size)
    return project(device, precision, info["tokens"], info["flops_per_token"],
                   tokens_per_second=tokens_per_second, price_per_hour=run_price(cfg, device))


def search_cost(path: str, args, overrides=()) -> tuple[dict, list]:
    """The KerasTuner search of a tune config: every trial at its base size and batch."""
    from tfpretrain.config import load_config
    from tfpretrain.training.budget import search_tokens

    tcfg = load_config(path, list(overrides))
    total = search_tokens(tcfg)
    trial_tokens = total // tcfg.tune.max_trials
    info = plan(tcfg, tokens=total)
    table = rows(info, args.precision or _table_precision(tcfg.train.precision), args)
    return {"config": path, "trials": tcfg.tune.max_trials, "tokens_per_trial": trial_tokens,
            **info, "rows": [r.to_dict() for r in table]}, table


def _table_precision(precision: str) -> str:
    return "mixed_bfloat16" if precision == "auto" else precision


def render(info: dict, table: list, title: str) -> str:
    lines = [title,
             f"  parameters {info['params']:,}; {info['flops_per_token']:,} FLOPs/token; "
             f"{info['tokens']:,.0f} tokens = {info['flops']:.3e} FLOPs",
             f"  Chinchilla-optimal for this size: {info['chinchilla_tokens']:,} tokens "
             f"(20/parameter); this run is {info['tokens'] / info['chinchilla_tokens']:.2f}x "
             "that",
             f"  {'device':<10} {'precision':<15} {'peak TF/s':>9} {'MFU':>6} {'tokens/s':>12} "
             f"{'hours':>10} {'$/h':>6} {'cost $':>10}"]
    for r in table:
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"  {r.device:<10} {r.precision:<15} {fmt(r.peak_tflops, '9.1f'):>9} "
                     f"{fmt(None if r.mfu is None else 100 * r.mfu, '5.1f'):>5}% "
                     f"{fmt(r.tokens_per_second, '12,.0f'):>12} {fmt(r.hours, '10,.2f'):>10} "
                     f"{r.price_per_hour:6.2f} {_money(r.cost_usd):>10}")
    return "\n".join(lines)


def _money(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if value >= 1 else f"{value:.4f}"


def _check_tune(path: str) -> None:
    """``--tune`` checked before anything is printed, its errors naming ``--tune``."""
    from tfpretrain.config import load_config

    try:
        load_config(path)
    except UserError as exc:
        raise UserError(str(exc).replace("--config", "--tune", 1)) from None


def estimate(cfg, args) -> dict:
    if args.tune:
        _check_tune(args.tune)
    info = plan(cfg, args.params, args.tokens)
    precision = args.precision or _table_precision(cfg.train.precision)
    table = rows(info, precision, args)
    if args.measure:
        table.append(measured_row(cfg, info, cfg.train.precision))  # as it would train
    print(render(info, table, f"# {cfg.name}: training"))
    mfu_note = ("measured" if args.tokens_per_second else
                f"MFU {args.mfu}" if args.mfu is not None else "MFU 0.30 assumed")
    print(f"  ({mfu_note}; prices: typical on-demand, override with --price-per-hour)")
    result = {**info, "precision": precision, "rows": [r.to_dict() for r in table]}
    chosen = next((r for r in table if args.device and r.device == args.device.lower()), None)
    if chosen is not None:
        result.update(hours=chosen.hours, cost_usd=chosen.cost_usd, device=chosen.device)
    if args.tune:
        # a measured tokens/s is for the trained model's size: the search keeps its MFU
        same_mfu = argparse.Namespace(**{**vars(args), "tokens_per_second": None,
                                         "mfu": chosen.mfu if chosen else args.mfu})
        search, table = search_cost(args.tune, same_mfu)
        print(render(search, table, f"# search {args.tune}: {search['trials']} trials x "
                     f"{search['tokens_per_trial']:,} tokens"))
        result["search"] = search
        if chosen is not None:
            row = next(r for r in table if r.device == chosen.device)
            result["search_cost_usd"] = row.cost_usd
            result["total_cost_usd"] = (row.cost_usd or 0) + (chosen.cost_usd or 0)
    return result


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    quiet_tensorflow()
    from tfpretrain.config import load_config

    for name in ("mfu", "price_per_hour"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name == "mfu" and not 0 < value <= 1)):
            raise UserError(f"--{name.replace('_', '-')} out of range. Received: {value}")
    if (args.tokens_per_second or args.price_per_hour is not None) and not args.device:
        raise UserError("--tokens-per-second and --price-per-hour describe one device: "
                        "add --device (e.g. --device l4)")
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(estimate(cfg, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
