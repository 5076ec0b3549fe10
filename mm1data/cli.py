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
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"run": cmd_run, "demo": cmd_demo}


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
