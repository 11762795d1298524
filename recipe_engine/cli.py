"""``recipe``: run, plan and validate recipes; list plugins.

Start-up stays light: nothing here imports an ML framework, and Hydra is imported only by
the commands that read a recipe.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recipe",
        description="Train language models from scratch with one declarative recipe.",
        epilog="Example: recipe run recipes/micro_code.yaml optim.lr=1e-3",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="path to a recipe .yaml file")
        sp.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim.lr=1e-3 model=micro_10m")

    r = sub.add_parser("run", help="run a recipe, reusing every stage whose fingerprint is unchanged")
    recipe_args(r)
    r.add_argument("-m", "--multirun", action="store_true",
                   help="Hydra multirun: sweep comma-separated override values (a=1,2 b=x,y)")
    r.add_argument("--json", action="store_true", help="print one JSON summary on stdout; logs go to stderr")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE and everything downstream even if cached ('*' for all); repeatable")
    r.add_argument("--until", metavar="STAGE", help="run only STAGE and the stages it depends on")
    r.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress display")

    v = sub.add_parser("validate", help="check a recipe without running anything; exit 1 if invalid")
    recipe_args(v)

    pl = sub.add_parser("plan", help="list the stages in order, each cached, stale or new")
    recipe_args(pl)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")

    pg = sub.add_parser("plugins", help="list installed plugin packages: components, config "
                        "groups, artifact kinds and hooks of each")
    pg.add_argument("--json", action="store_true", help="print as JSON")
    return p


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[Any]:
    """Keep stdout clean for one JSON object: route fd 1 (Python and C libraries, and child
    processes) to stderr while the work runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout.flush()
        sys.stdout = old
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _log_to(progress: Any) -> Iterator[None]:
    """Print the ``recipe_engine`` loggers' records (stages' ``ctx.log``, store warnings)
    through the progress display while a run lasts."""
    import logging

    logger = logging.getLogger("recipe_engine")
    handler = progress.handler()
    logger.addHandler(handler)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _plugin_manager() -> Any:
    from .plugins import PluginManager

    return PluginManager()


def _load(args: argparse.Namespace, pm: Any) -> Any:
    from . import config
    from .validate import validate

    loaded = config.load(args.recipe, args.overrides, pm.config_dirs())
    return validate(loaded, pm.registry, pm.hook.recipe_default_executor())


def cmd_plugins(args: argparse.Namespace) -> int:
    pm = _plugin_manager()
    packages = pm.describe()["packages"]
    if args.json:
        # top-level "components" and "config_dirs": the format before per-package listing
        rows = [{**c, "package": p["name"]} for p in packages for c in p["components"]]
        print(json.dumps({"packages": packages, "components": rows,
                          "config_dirs": pm.config_dirs()}, indent=2))
        return EXIT_OK
    cols = ("kind", "name", "version")
    widths = [max([len(h)] + [len(str(c[h])) for p in packages for c in p["components"]])
              for h in cols]
    for i, p in enumerate(packages):
        print(("\n" if i else "") + f"{p['name']} {p['version']}  {p['location']}".rstrip())
        if p["components"]:
            print("  components:")
            print("    " + "  ".join(h.upper().ljust(w) for h, w in zip(cols, widths)) + "  DESCRIPTION")
            for c in p["components"]:
                cells = "  ".join(str(c[h]).ljust(w) for h, w in zip(cols, widths))
                print(f"    {cells}  {c['description']}".rstrip())
        if p["config_dirs"]:
            print(f"  config dirs: {', '.join(p['config_dirs'])}")
        if p["config_groups"]:
            print("  config groups:")
            for group, options in p["config_groups"].items():
                print(f"    {group}: {', '.join(options)}")
        if p["artifact_kinds"]:
            width = max(map(len, p["artifact_kinds"]))
            print("  artifact kinds:")
            for kind, description in p["artifact_kinds"].items():
                print(f"    {kind.ljust(width)}  {description}")
        if p["hooks"]:
            print(f"  hooks: {', '.join(p['hooks'])}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    pm = _plugin_manager()
    recipe = _load(args, pm)
    print(f"{args.recipe}: valid, {len(recipe.stages)} stages: {' -> '.join(recipe.stages)}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .runner import plan
    from .store import Store

    pm = _plugin_manager()
    recipe = _load(args, pm)
    store = Store(args.store)
    planned = plan(recipe, pm, store)
    if args.json:
        print(json.dumps({"recipe": recipe.name, "store": str(store.root), "stages": [
            {"name": p.name, "component": p.spec.component.name, "fingerprint": p.fingerprint,
             "status": p.status, "inputs": p.spec.inputs, "estimates": p.estimates}
            for p in planned]}, indent=2, default=str))
        return EXIT_OK
    print(f"recipe {recipe.name}  (store {store.root})")
    for i, p in enumerate(planned, 1):
        ins = ", ".join(f"{s}<-{u}" for s, u in p.spec.inputs.items())
        print(f"{i:>3}. {p.name:<14} {p.status:<7} {p.spec.component.name:<18} "
              f"{p.fingerprint[:12]}  {ins}")
        for k, v in p.estimates.items():
            if k != "meta":
                print(f"       {k}: {v}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .progress import Progress
    from .runner import StageFailed, format_error, run
    from .store import Store
    from .validate import validate

    pm = _plugin_manager()
    store = Store(args.store)
    force = set(args.force)

    def job(loaded: Any) -> dict:
        recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
        progress = Progress(len(recipe.stages), enabled=not args.quiet)
        with _log_to(progress):
            return run(recipe, pm, store, force=force, until=args.until, progress=progress)

    out = contextlib.nullcontext(sys.stdout) if not args.json else _stdout_to_stderr()
    with out as real_stdout:
        try:
            if args.multirun:
                sweep_dir = store.root / "multirun" / time.strftime("%Y%m%d-%H%M%S")
                jobs = config.multirun(args.recipe, args.overrides, pm.config_dirs(), sweep_dir, job)
                result: dict[str, Any] = {"recipe": Path(args.recipe).stem, "jobs": jobs}
                failed = any("error" in j for j in jobs)
                for j in jobs:
                    if "error" in j:
                        print(f"job {j['overrides']}: {j['error']}", file=sys.stderr)
            else:
                result = job(config.load(args.recipe, args.overrides, pm.config_dirs()))
                failed = False
        except StageFailed as e:
            print(f"error: {format_error(e)}", file=sys.stderr)
            if args.json:
                print(json.dumps({**e.summary, "error": str(e)}), file=real_stdout, flush=True)
            return EXIT_FAILED
        if args.json:
            print(json.dumps(result, default=str), file=real_stdout, flush=True)
        else:
            _print_summary(result)
    return EXIT_FAILED if failed else EXIT_OK


def _print_summary(result: dict[str, Any]) -> None:
    summaries = result.get("jobs") or [result]
    for s in summaries:
        if "overrides" in s:
            print(f"job {' '.join(s['overrides']) or '(no overrides)'}")
        for st in s.get("stages", []):
            metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in st.get("metrics", {}).items()
                               if isinstance(v, (int, float)) and k != "seconds")
            print(f"  {st['name']:<14} {st['status']:<6} {st['seconds']:>8.1f}s  {metrics}")
        if "error" in s:
            print(f"  error: {s['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`recipe run r.yaml --json a=1`): keep them, in order
    flags = [a for a in extra if a.startswith("-")]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from .errors import RecipeError

    try:
        return {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
                "plugins": cmd_plugins}[args.command](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; finished stages stay committed, the running one resumes next time",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
