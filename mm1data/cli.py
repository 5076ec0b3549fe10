"""The `mm1data` command: one entry point, subcommands in one dict."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from mm1data.config import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from mm1data.pipelines import run_pipeline

    index = run_pipeline(args.pipeline, args.input, args.output, args.set or [], args.address)
    print_funnel(index, args.output or index["config"]["output"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mm1data.demo import run_demo

    run_demo(args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mm1data.train.train import train

    summary = train(
        args.manifest,
        args.config,
        args.steps,
        args.out,
        resume=args.resume,
        force=args.force,
        overrides=args.set or [],
    )
    if "last" in summary:
        held = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("heldout", {}).items())
        print(
            f"step {summary['steps']}: loss {summary['last']['loss']:.4f}"
            + (f", held-out {held}" if held else "")
            + f" -> {args.out}/metrics.jsonl"
        )
    else:
        print(f"nothing to do: the checkpoint is at step {summary['start_step']} >= --steps {args.steps}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    return MANIFEST_COMMANDS[args.manifest_command](args)


def cmd_manifest_check(args: argparse.Namespace) -> int:
    import json

    from mm1data.manifest import check_manifest, format_report, load_manifest

    report = check_manifest(load_manifest(args.manifest), args.budget_tokens)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def token_count(value: str) -> int:
    """An integer token count; 4e11 and 400_000_000_000 are accepted too."""
    digits = value.replace("_", "")
    if digits.isdigit():
        return int(digits)
    try:
        number = float(digits)
    except ValueError:
        number = -1.0
    if not (number >= 0 and number.is_integer()):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"not a token count: {value}")
    return int(number)


def print_funnel(index: dict, output: str) -> None:
    f = index["funnel"]
    print(f"rows in      {f['rows_in']:>9,}")
    if "downloaded" in f:
        print(f"downloaded   {f['downloaded']:>9,}")
    for reason, n in f["dropped"].items():
        print(f"  dropped    {n:>9,}  {reason}")
    print(f"kept         {f['kept']:>9,}")
    t = index["totals"]
    print(f"{len(index['shards'])} shards, {t['samples']:,} samples, {t['bytes'] / 1e6:,.1f} MB -> {output}")
    for w in index.get("warnings", []):
        print(f"warning: {w}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm1data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a corpus pipeline (pipelines/*.yaml) on Ray")
    r.add_argument("pipeline", help="run config YAML, e.g. pipelines/caption.yaml")
    r.add_argument("--input", help="input file, directory or glob (local or s3://)")
    r.add_argument("--output", help="corpus root (local or s3://)")
    r.add_argument("--address", help="Ray address (auto, ray://host:10001); default: a local Ray")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (YAML value)")
    d = sub.add_parser("demo", help="build a small corpus end to end from a local HTTP server")
    d.add_argument("--out", default="demo_out", help="where the demo writes (default: demo_out)")
    t = sub.add_parser("train", help="train the MM1-shaped model from a manifest's shards (torchrun for DDP)")
    t.add_argument("--manifest", required=True, help="mixture manifest YAML (its sequence block sets the shape)")
    t.add_argument("--config", required=True, help="tiny | small | mm1_3b, or a train config YAML")
    t.add_argument("--steps", required=True, type=int, help="train until this global step")
    t.add_argument("--out", required=True, help="folder for metrics.jsonl, loss.png, config.json, checkpoint/")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (exactly)")
    t.add_argument("--force", action="store_true", help="resume even with another manifest or config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train config key (YAML value)")
    m = sub.add_parser("manifest", help="mixture manifests (manifests/*.yaml)")
    msub = m.add_subparsers(dest="manifest_command", required=True)
    c = msub.add_parser("check", help="resolve every index, verify the shards, print totals and realised shares")
    c.add_argument("manifest", help="manifest YAML, e.g. manifests/mm1.yaml")
    c.add_argument("--budget-tokens", type=token_count, metavar="N", help="text tokens to train on: epochs per source")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "demo": cmd_demo,
    "manifest": cmd_manifest,
    "train": cmd_train,
}
MANIFEST_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"check": cmd_manifest_check}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"mm1data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
