"""The ``synrep`` command line: one subcommand per stage, each ``[--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import ConfigError, load_config
from .distributed import env_dist_info
from .errors import SynrepError
from .utils import setup_logging

LOG = logging.getLogger("synrep")

COMMANDS = {
    "captions": "stage 1: write captions for a concept list with a language model (or the template backend)",
    "generate": "stage 2: draw n images per caption into crash-safe tar shards",
    "train": "stage 3: learn an encoder (simclr, supcon, stablerep, stablerep+, synclr, supervised)",
    "eval": "stage 4: judge a frozen encoder on a real dataset (linear probe, kNN, few-shot)",
    "run": "all stages from one config, each skipped when complete, then the report",
    "report": "rebuild report.md and its figures from a run folder",
    "study": "the miniature replication: every method on the same budget, judged on real test images",
    "generator": "the embedded text-to-image model: `generator train` and `generator fidelity`",
    "audit": "judge a shard folder: caption-image agreement, balance, memorization, diversity (audit.md + audit.json)",
}

EPILOG = """Every command takes an optional --config FILE (YAML) and any number of key=value overrides,
with dots for nested keys (train.backbone.name=vit-micro). The resolved config is saved next to the outputs.
Examples:
  synrep captions per_concept=20 out_dir=runs/captions
  synrep generate captions=runs/captions/captions.jsonl out_dir=runs/shards guidance_scale=2.5
  synrep train data=runs/shards method=stablerep steps=300
  synrep eval encoder=runs/train/encoder dataset=fashion-mnist
  synrep audit runs/shards out_dir=runs/audit
  synrep run --quick
"""


def _config_class(command: str, sub: str | None):
    if command == "captions":
        from .captions.stage import CaptionsConfig
        return CaptionsConfig
    if command == "generate":
        from .generate.stage import GenerateConfig
        return GenerateConfig
    if command == "train":
        from .training.loop import TrainConfig
        return TrainConfig
    if command == "eval":
        from .evaluation.stage import EvalConfig
        return EvalConfig
    if command == "run":
        from .pipeline import RunConfig
        return RunConfig
    if command == "study":
        from .study import StudyConfig
        return StudyConfig
    if command == "generator" and sub == "train":
        from .embedded_t2i.train import GeneratorTrainConfig
        return GeneratorTrainConfig
    if command == "generator" and sub == "fidelity":
        from .embedded_t2i.fidelity import FidelityConfig
        return FidelityConfig
    if command == "audit":
        from .audit.stage import AuditConfig
        return AuditConfig
    raise ConfigError(f"no config for {command} {sub or ''}")


class _HelpWithKeys(argparse.Action):
    """``-h``: the usual help, then every config key of the command with its type or choices and default."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .config import describe_keys

        parser.print_help()
        command = parser.prog.split()[-1]
        try:
            rows = describe_keys(_config_class(command, "train" if command == "generator" else None))
        except ConfigError:
            parser.exit()
        width = max(len(k) for k, *_ in rows)
        print("\nconfig keys (key=value; nested keys with dots):")
        for key, kind, default, meaning in rows:
            print(f"  {key.ljust(width)}  {kind}, default {default}" + (f": {meaning}" if meaning else ""))
        sys.stdout.flush()  # a closed pipe fails here, inside main's handler, not at interpreter exit
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synrep", description="Learn visual representations from generative models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"synrep {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = subs.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help, every config key, and exit")
        if name == "generator":
            p.add_argument("action", choices=["train", "fidelity"], help="train the model, or measure its fidelity/diversity")
        if name == "report":
            p.add_argument("run_dir", help="a run folder written by `synrep run`")
            continue
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        if name == "run":
            p.add_argument("--quick", action="store_true", help="the ~3-minute profile (fewer captions, steps and probe images)")
        if name == "generate":
            p.add_argument("--preview", action="store_true", help="only write preview.png of an existing shard folder (out_dir)")
        if name in ("train", "generator"):
            p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a YAML parser's message spans several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code.

    synrep's own errors (:class:`SynrepError`: bad input, missing data, a refused resume) are logged as one line
    and give exit code 2; Ctrl-C gives 130. Anything else is a bug, or an error of the operating system (disk
    full, permission denied), and propagates with its traceback (exit code 1).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `synrep train --help | head`: the reader closed the pipe before the help ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    setup_logging(env_dist_info().rank)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        LOG.error("interrupted; completed outputs are kept and a rerun of the same command resumes")
        return 130
    except SynrepError as err:
        LOG.error("%s", _one_line(err))
        return 2


def _dispatch(args) -> int:
    from .config import config_to_dict

    if args.command == "report":
        from .report import write_report

        print(write_report(args.run_dir))
        return 0
    sub = getattr(args, "action", None)
    overrides = list(args.overrides)
    if args.command == "audit" and overrides and "=" not in overrides[0]:  # `synrep audit <shard folder> ...`
        overrides[0] = f"data={overrides[0]}"
    profile: list[str] = []
    if args.command == "run" and args.quick:
        from .pipeline import QUICK_OVERRIDES

        profile = QUICK_OVERRIDES  # below --config and the overrides: what the user names wins
    cfg = load_config(_config_class(args.command, sub), args.config, overrides, profile)
    if args.show_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    if args.command == "captions":
        from .captions.stage import run_captions

        print(run_captions(cfg))
    elif args.command == "generate":
        from .generate.stage import run_generate, write_preview

        print(write_preview(cfg.out_dir) if args.preview else run_generate(cfg))
    elif args.command == "train":
        from .training.loop import train

        if args.no_resume:
            cfg.resume = False
        print(train(cfg))
    elif args.command == "eval":
        from .evaluation.stage import evaluate, headline

        print(headline(evaluate(cfg)))
    elif args.command == "run":
        from .pipeline import run_pipeline

        summary = run_pipeline(cfg)
        print(f"\nreport: {summary['report']}")
        for name, text in summary["headline"].items():
            print(f"  {name:8s} {text}")
        print(f"wall time per stage (s): {json.dumps(summary['timings_s'])}")
    elif args.command == "study":
        from .study import run_study

        print(run_study(cfg))
    elif args.command == "generator" and sub == "train":
        from .embedded_t2i.train import train_generator

        print(train_generator(cfg, resume=not args.no_resume))
    elif args.command == "generator" and sub == "fidelity":
        from .embedded_t2i.fidelity import run_fidelity

        results = run_fidelity(cfg)
        print(json.dumps({s: round(r["mean_fidelity"], 1) for s, r in results["scales"].items()}))
    elif args.command == "audit":
        from .audit.stage import headline, run_audit

        print(headline(run_audit(cfg), cfg.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
