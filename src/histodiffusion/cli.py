"""The `histodiffusion` command: one subcommand per stage, flags built from the stage's config class,
plus `info RUN_DIR` (info.py) and `--version`.

A subcommand only parses flags (and an optional --config file) into the stage's frozen config and
calls the stage's run function from the stage registry (registry.py). Stage modules are imported only
when their command runs, so `histodiffusion --help` answers without importing torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from . import __version__
from .runtime.config import config_from_dict
from .runtime.configtypes import help_of, load_config_file
from .runtime.errors import HistoError
from .runtime.registry import STAGES

# commands that are not stages: name -> (function(RUN_DIR) -> exit code, description)
def _info(run_dir: str) -> int:
    from .info import show
    return show(run_dir)


COMMANDS: dict[str, tuple] = {
    "info": (_info, "a run's stages, whether each is complete, and its key figures"),
}


def _flag_type(tp: typing.Any):
    origin = typing.get_origin(tp)
    if origin is tuple or tp is bool:
        return str  # lists are comma-separated; bools are true/false; coerce() checks both
    return {int: str, float: str, str: str}[tp]


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        metavar = "LIST" if typing.get_origin(tp) is tuple else ("BOOL" if tp is bool else tp.__name__.upper())
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(tp), default=None,
                            metavar=metavar,  # argparse formats help with %: a literal % is doubled
                            help=f"{help_of(cls, f.name)} (default: {shown!s})".replace("%", "%%"))


def log_flags() -> argparse.ArgumentParser:
    """--quiet, --verbose, --progress-every (LogConfig): accepted before and after the subcommand."""
    from .runtime.progresslog import LogConfig

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    for f in dataclasses.fields(LogConfig):  # SUPPRESS: a flag after the subcommand does not reset one before it
        flag, text = f"--{f.name.replace('_', '-')}", help_of(LogConfig, f.name)
        if f.type in (bool, "bool"):
            g.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            g.add_argument(flag, dest=f.name, type=str, default=argparse.SUPPRESS, metavar="PERCENT",
                           help=f"{text} (default: {f.default:g})".replace("%", "%%"))
    return p


def log_config_from_args(args: argparse.Namespace):
    from .runtime.progresslog import LogConfig

    return config_from_dict(LogConfig, {f.name: getattr(args, f.name) for f in dataclasses.fields(LogConfig)
                                        if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    flags = log_flags()
    p = argparse.ArgumentParser(prog="histodiffusion", parents=[flags], description=(
        "Synthetic augmentation of histopathology classification with a latent diffusion model "
        "pretrained on unlabeled data (HistoDiffusion)."))
    p.add_argument("--version", action="version", version=f"histodiffusion {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, st in STAGES.items():
        sp = sub.add_parser(name, help=st.help, description=st.help, parents=[flags])
        sp.add_argument("--config", default=None, metavar="FILE",
                        help="JSON or TOML file of config fields (flags override it)")
        add_config_flags(sp, st.config)
    for name, (_, desc) in COMMANDS.items():
        sp = sub.add_parser(name, help=desc, description=desc, parents=[flags])
        sp.add_argument("run_dir", metavar="RUN_DIR", help="run directory (made by `histodiffusion run`)")
    return p


def config_from_args(name: str, args: argparse.Namespace):
    cls = STAGES[name].config
    values: dict = {}
    if args.config:
        data = load_config_file(args.config)
        if isinstance(data, dict) and "config" in data and "stage" in data:  # a run's config.json
            data = data["config"]
        values.update(data)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return config_from_dict(cls, values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything at run time
    try:
        from .runtime.progresslog import apply_log_config

        apply_log_config(log_config_from_args(args))
        if args.command in COMMANDS:
            return COMMANDS[args.command][0](args.run_dir)
        STAGES[args.command](config_from_args(args.command, args))
    except HistoError as e:
        _close_progress_bars()
        print(f"histodiffusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or missing output location, unreadable input file
        _close_progress_bars()
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f)
        print(f"histodiffusion {args.command}: error: {e.strerror or e}" + (f": {where}" if where else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histodiffusion {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        from .runtime.distributed import end_process_group

        end_process_group()
    return 0


def _close_progress_bars() -> None:
    """End any progress bar left open by the failed stage, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def entry() -> None:
    """The `histodiffusion` command and `python -m histodiffusion`: main(), then its exit code through
    exit_process (a worker of torchrun / accelerate launch skips the interpreter's finalization)."""
    from .runtime.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
