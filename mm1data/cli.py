"""mm1data builds the pre-training mixture of an MM1-style multimodal LLM: its corpora (image-caption pairs, text
documents and the other kinds `mm1data run --help` lists) are downloaded, filtered, CLIP-scored and deduplicated on
Ray Data into webdataset tar shards with an index.json and a score store (meta/*.parquet); a mixture manifest weights
the corpora, a streaming loader packs them into MM1 sequences and a compact trainer trains on them."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable

from mm1data.config import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from mm1data.pipelines import run_pipeline

    index = run_pipeline(args.pipeline, args.input, args.output, args.set or [], args.address)
    print_funnel(index, args.output or index["config"]["output"])
    return 0


def cmd_refilter(args: argparse.Namespace) -> int:
    from mm1data.refilter import refilter

    index = refilter(args.source, args.filters, args.output, args.set or [], args.address)
    print_funnel(index, index["config"]["output"])
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    return CONFIG_COMMANDS[args.config_command](args)


def cmd_config_show(args: argparse.Namespace) -> int:
    from mm1data.pipelines import show_config

    print(show_config(args.pipeline, args.set or []), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mm1data.report import manifest_report, write_report

    if bool(args.output) == bool(args.manifest):
        raise ConfigError("mm1data report: give a corpus OUTPUT_URI or --manifest M (one of them)")
    if args.manifest:
        page = manifest_report(manifest_path(args.manifest), args.html)
    else:
        page = write_report(args.output, args.html)
    print(f"report: {page}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mm1data.demo import run_demo

    run_demo(args.out, n=args.rows, steps=args.steps)
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


def cmd_blocklist(args: argparse.Namespace) -> int:
    from mm1data.blocklist import BuildOptions, build

    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    opts = BuildOptions(image_col=args.image_col, text_cols=tuple(args.text_col or ()), workers=args.workers)
    print(build(args.source, args.output, opts).line(args.output))
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    return MANIFEST_COMMANDS[args.manifest_command](args)


def cmd_manifest_check(args: argparse.Namespace) -> int:
    import json

    from mm1data.manifest import check_manifest, format_report, load_manifest

    report = check_manifest(load_manifest(manifest_path(args.manifest)), args.budget_tokens)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def manifest_path(spec: str) -> str:
    """A manifest file, or a shipped one by bare name (`mm1` is manifests/mm1.yaml, also from an installed wheel)."""
    import os

    from mm1data import presets

    if os.path.isfile(spec) or "://" in spec:
        return spec
    shipped = presets.find("manifests", spec)
    return str(shipped) if shipped else spec


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
    for what in ("images", "paragraphs"):  # a corpus of documents: the positions inside them
        if what in f:
            c = f[what]
            got = f", {c['downloaded']:,} downloaded" if "downloaded" in c else ""
            print(f"{what:<12} {c.get('in', 0):>9,} in{got}, {c.get('kept', 0):,} kept in kept documents")
            for reason, n in sorted(f.get(f"{what}_dropped", {}).items(), key=lambda kv: -kv[1]):
                print(f"  removed    {n:>9,}  {reason}")
    t = index["totals"]
    print(f"{len(index['shards'])} shards, {t['samples']:,} samples, {t['bytes'] / 1e6:,.1f} MB -> {output}")
    for t in index.get("thresholds", []):
        side = "min" if "min_percentile" in t else "max"
        print(
            f"threshold    {t['filter']} {side}_percentile {t[side + '_percentile']:g} = {t['threshold']} over "
            f"{t['population']:,} rows ({t['dropped']:,} dropped)"
        )
    for w in index.get("warnings", []):
        print(f"warning: {w}")


EPILOG = """quick start:
  mm1data demo                                   build small corpora end to end, check them, train a few steps
  mm1data run caption --input urls.parquet --output out/caption
  mm1data refilter out/caption --filters caption_datacomp_clip30 --output out/clip30   re-threshold, no download
  mm1data report out/caption                     the funnel, score histograms and samples as one HTML page
  mm1data manifest check manifests/mm1.yaml      verify a mixture and print its realised shares

`mm1data COMMAND --help` says more about each command."""

# the keys people set most; `mm1data config show KIND` prints every key with its default
MAIN_KEYS = {
    "caption": "input.url_col, input.caption_col, input.rows_per_unit, download.threads, download.timeout_s, "
    "download.retries, download.image_size, download.resize_mode, download.allow_private_hosts, filters, "
    "clip.model, clip.pretrained, clip.workers, recaption.enabled, recaption.model, recaption.pretrained, dedup.url, "
    "dedup.image_sha256, dedup.reference, dedup.decontam.threshold, shards.samples_per_shard",
    "interleaved": "input.form, input.texts_col, input.images_col, input.rows_per_unit, input.max_images, "
    "download.threads, download.timeout_s, download.image_size, filters, clip.enabled, clip.model, "
    "clip.pretrained, relevance.min, dedup.url, dedup.image_set, dedup.max_image_docs, "
    "dedup.max_domain_paragraph, dedup.reference, batch_size, shards.samples_per_shard",
    "text": "input.text_col, input.id_col, input.rows_per_unit, input.html, filters, dedup.exact, "
    "dedup.minhash.enabled, dedup.minhash.bands, dedup.minhash.rows, dedup.reference, dedup.decontam.ngram, "
    "batch_size, shards.samples_per_shard",
}


def run_epilog() -> str:
    """run --help's list of shipped run configs, filter presets and the main keys (from the shipped files)."""
    from mm1data import presets

    lines = [
        f"run configs (pipelines/, or by bare name): {', '.join(presets.names('pipelines'))}",
        f"filter presets (--set filters=NAME): {', '.join(presets.names('filters'))}; --set filters=[] runs none",
        "main config keys (--set KEY=VALUE, the value parsed as YAML):",
    ]
    lines += [
        textwrap.fill(f"{kind}: {keys}", 110, initial_indent="  ", subsequent_indent="    ")
        for kind, keys in MAIN_KEYS.items()
    ]
    lines += [
        "every key with its default: mm1data config show caption [--set ...]",
        "",
        "example:",
        "  mm1data run caption --input urls.parquet --output s3://bucket/caption \\",
        "      --set filters=caption_laion --set download.timeout_s=5",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from mm1data import __version__

    p = argparse.ArgumentParser(
        prog="mm1data", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"mm1data {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs and every INFO line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="run a corpus pipeline (pipelines/*.yaml) on Ray",
        description="Run a corpus job: read -> download -> filters -> CLIP score -> dedup -> shards, meta, index.json."
        " Rerunning the same command after a crash finishes the job.",
        epilog=run_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("pipeline", help="run config YAML (e.g. pipelines/caption.yaml) or a shipped one by name (caption)")
    r.add_argument("--input", help="input file, directory or glob (local or s3://)")
    r.add_argument("--output", help="corpus root (local or s3://)")
    r.add_argument("--address", help="Ray address (auto, ray://host:10001); default: a local Ray")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (YAML value)")
    r.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Ray's own logs")
    rf = sub.add_parser(
        "refilter",
        help="a new output from an existing one's staging with another filter chain (no download, no scoring)",
        description="Write NEW_URI's shards, meta and index.json from OUTPUT_URI/_staging with the chain --filters "
        "and --set dedup.* / shards.* settings: no download or model scoring again. Rows the source dropped before "
        "its filters stay dropped; the rest are decided again. Rerunning the same command after a crash finishes it.",
    )
    rf.add_argument("source", metavar="OUTPUT_URI", help="an mm1data output (local or s3://) holding _staging/")
    rf.add_argument("--filters", required=True, help="filter chain YAML or a preset name (filters/)")
    rf.add_argument("--output", required=True, metavar="NEW_URI", help="the new output (not OUTPUT_URI)")
    rf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dedup.* or shards.* key (YAML)")
    rf.add_argument("--address", help="Ray address (auto, ray://host:10001); default: a local Ray")
    g = sub.add_parser("config", help="run configs: print one resolved, with every default")
    gsub = g.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    gs = gsub.add_parser("show", help="print the resolved run config (YAML file + --set + defaults) as YAML")
    gs.add_argument("pipeline", help="run config YAML or a shipped one by name (caption, text)")
    gs.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (YAML value)")
    rp = sub.add_parser(
        "report",
        help="one HTML page: a corpus' funnel, score histograms, failing domains, samples (or a manifest's mix)",
    )
    rp.add_argument("output", nargs="?", help="corpus root (local or s3://) holding index.json")
    rp.add_argument("--html", help="page to write (default: OUTPUT/report.html, or beside the manifest)")
    rp.add_argument("--manifest", help="a mixture manifest: its target against the realised mix, and each corpus")
    d = sub.add_parser(
        "demo",
        help="every corpus kind end to end from a local HTTP server, manifest check, reports, a few training steps",
    )
    d.add_argument("--out", default="demo_out", help="where the demo writes (default: demo_out)")
    d.add_argument("--rows", type=int, default=300, help="input rows per corpus (default: 300)")
    d.add_argument("--steps", type=int, default=30, help="training steps of the tiny model; 0 skips (default: 30)")
    t = sub.add_parser("train", help="train the MM1-shaped model from a manifest's shards (torchrun for DDP)")
    t.add_argument("--manifest", required=True, help="mixture manifest YAML (its sequence block sets the shape)")
    t.add_argument("--config", required=True, help="tiny | small | mm1_3b, or a train config YAML")
    t.add_argument("--steps", required=True, type=int, help="train until this global step")
    t.add_argument("--out", required=True, help="folder for metrics.jsonl, loss.png, config.json, checkpoint/")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (exactly)")
    t.add_argument("--force", action="store_true", help="resume even with another manifest or config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train config key (YAML value)")
    b = sub.add_parser("blocklist", help="eval-set blocklists for dedup.reference (image hashes and texts)")
    bsub = b.add_subparsers(dest="blocklist_command", required=True, metavar="SUBCOMMAND")
    bb = bsub.add_parser(
        "build",
        help="hash the images and collect the texts of an eval set into a blocklist parquet",
        description=textwrap.fill(
            "Hash every image (sha256 of its bytes, 64-bit pHash of the decoded image) and collect every "
            "eval text (questions, captions) under SOURCE into one parquet (kind, source, sha256, phash, text), for "
            "`mm1data run ... --set dedup.reference=[BLOCKLIST.parquet]`: matching images and texts are then dropped "
            "with reason eval_contamination. Files are read by extension: images (jpg, png, webp, gif, bmp, tiff), "
            "webdataset tar shards (their image members), parquet (an image column of bytes or Hugging Face's "
            "{bytes, path} struct; text columns with --text-col), jsonl (text columns with --text-col). An image that "
            "does not decode keeps its sha256 row; the summary line counts it, and everything not listed.",
            100,
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              mm1data blocklist build coco/val2014/ -o blocklists/coco_val.parquet
              mm1data blocklist build 's3://evals/nocaps/*.tar' -o s3://evals/blocklists/nocaps.parquet
              mm1data blocklist build vqav2/validation-*.parquet --text-col question -o vqav2.parquet
              mm1data blocklist build coco_captions.jsonl --text-col captions -o coco_captions.parquet"""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bb.add_argument("source", help="a file, folder (recursive) or glob, local or s3://")
    bb.add_argument("-o", "--output", required=True, help="the blocklist to write, ending .parquet (local or s3://)")
    bb.add_argument(
        "--image-col", metavar="COL", help="parquet column of image bytes or {bytes, path} (default: image, if any)"
    )
    bb.add_argument(
        "--text-col",
        action="append",
        metavar="COL",
        help="parquet/jsonl column of eval text: a string or a list of strings per row (repeat for more columns)",
    )
    bb.add_argument("--workers", type=int, default=0, help="hashing processes (default 0: one per CPU)")
    m = sub.add_parser("manifest", help="mixture manifests (manifests/*.yaml)")
    msub = m.add_subparsers(dest="manifest_command", required=True)
    c = msub.add_parser("check", help="resolve every index, verify the shards, print totals and realised shares")
    c.add_argument("manifest", help="manifest YAML, e.g. manifests/mm1.yaml, or a shipped one by name (mm1)")
    c.add_argument("--budget-tokens", type=token_count, metavar="N", help="text tokens to train on: epochs per source")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "refilter": cmd_refilter,
    "config": cmd_config,
    "report": cmd_report,
    "demo": cmd_demo,
    "manifest": cmd_manifest,
    "blocklist": cmd_blocklist,
    "train": cmd_train,
}
MANIFEST_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"check": cmd_manifest_check}
CONFIG_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"show": cmd_config_show}


def main(argv: list[str] | None = None) -> int:
    from mm1data import progress

    args = build_parser().parse_args(argv)
    progress.configure(verbose=args.verbose)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"mm1data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
