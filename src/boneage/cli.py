"""The command line every stage shares: `--config FILE [--set key=value ...] [--force] [--debug]`.

`run_stage` loads the config, logs to `work_dir/logs/{stage}.log`, writes the resolved config
next to the logs, records the stage's wall time in `work_dir/logs/times.json` (the report reads
it), and turns a `BoneAgeError` into one clear line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from boneage.config import Config, load_config, save_resolved
from boneage.errors import BoneAgeError

log = logging.getLogger("boneage")


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML profile (default configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo every item, even finished ones")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def setup_logging(log_path: Path | None, debug: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def record_time(work: Path, stage: str, seconds: float, status: str) -> None:
    """Append this stage's wall time to `logs/times.json` (last run of each stage wins)."""
    path = work / "logs" / "times.json"
    try:
        times = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        times = {}
    times[stage] = {"seconds": round(seconds, 2), "status": status, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    from boneage.fileio import atomic_write_json

    atomic_write_json(path, times)


def run_stage(stage: str, description: str, main: Callable[[Config, argparse.Namespace], None],
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
              argv: list[str] | None = None) -> int:
    """Parse the command line, run `main(cfg, args)`, report errors for people. Returns the exit code."""
    parser = stage_parser(description)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = None
    try:
        cfg = load_config(args.config, args.overrides)
        work = cfg.work_path
        setup_logging(work / "logs" / f"{stage}.log", args.debug)
        save_resolved(cfg, work / "logs" / f"{stage}.config.yaml")
        log.info("%s: config %s %s", stage, args.config, " ".join(args.overrides))
        main(cfg, args)
    except BoneAgeError as exc:
        if args.debug:
            raise
        print(f"error [{stage}]: {exc}", file=sys.stderr)
        if work is not None:
            record_time(work, stage, time.perf_counter() - start, "error")
        return 2
    except KeyboardInterrupt:
        print(f"[{stage}] interrupted; finished items are kept, a rerun resumes", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    record_time(work, stage, seconds, "ok")
    log.info("%s: done in %.1f s", stage, seconds)
    return 0
