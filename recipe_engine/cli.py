"""``recipe``: run, plan and validate recipes; show a run's data funnel; report a run (or a
sweep) as HTML; write a Slurm batch script for a multi-node run; list plugins; verify, list
and clean the store.

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
import uuid
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
    r.add_argument("--fresh", action="append", default=[], metavar="STAGE",
                   help="if STAGE runs, start it from empty scratch instead of resuming an "
                   "earlier attempt ('*' for all); repeatable")
    r.add_argument("--until", metavar="STAGE", help="run only STAGE and the stages it depends on")
    r.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress display")

    sb = sub.add_parser("sbatch", help="write a Slurm batch script that runs a recipe on "
                        "several nodes, one `recipe run` per node through srun (node 0 runs "
                        "the data stages; every node starts its processes for training)")
    recipe_args(sb)
    sb.add_argument("--nodes", type=_positive_int, required=True, metavar="N",
                    help="nodes of the job (NNODES)")
    sb.add_argument("--gpus-per-node", type=_count, default=0, metavar="G",
                    help="GPUs to ask for on each node (default 0: none asked for)")
    sb.add_argument("--partition", metavar="P", help="Slurm partition")
    sb.add_argument("--time", metavar="T", help="time limit, as Slurm takes it (e.g. 2-00:00:00)")
    sb.add_argument("--account", metavar="A", help="Slurm account to charge")
    sb.add_argument("--job-name", metavar="NAME", help="job name (default: the recipe's name)")
    sb.add_argument("--store", metavar="DIR", help="store root, on a file system every node "
                    "mounts (default: $RECIPE_STORE or ./recipe_store)")
    sb.add_argument("-o", "--out", metavar="FILE", help="the script to write (default: "
                    "<store>/slurm/<recipe>-<time>.sbatch)")
    sb.add_argument("--dry-run", action="store_true", help="print the script; write nothing")

    v = sub.add_parser("validate", help="check a recipe without running anything; exit 1 if invalid")
    recipe_args(v)

    pl = sub.add_parser("plan", help="list the stages in order, each cached, stale or new")
    recipe_args(pl)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")

    sh = sub.add_parser("show", help="print the data funnel of a recipe's last run: documents "
                        "and bytes in and out of each data stage, drop reasons, languages, "
                        "duplicate clusters")
    sh.add_argument("recipe", help="path to a recipe .yaml file")
    sh.add_argument("overrides", nargs="*", metavar="STAGE|OVERRIDE",
                    help="stages to show in detail, every reason and count (default: every "
                    "data stage, the top reasons), and Hydra overrides, e.g. data.count=10")
    sh.add_argument("--json", action="store_true", help="print the funnel as JSON")
    sh.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")

    rp = sub.add_parser("report", help="write a static HTML report of a recipe's run: the "
                        "stage graph with status, time and metrics, the data funnel, training "
                        "curves, eval tables, generation samples; with -m, compare a sweep's jobs")
    recipe_args(rp)
    rp.add_argument("-m", "--multirun", action="store_true",
                    help="compare the jobs of a sweep (the overrides given to `recipe run -m`)")
    rp.add_argument("--metric", metavar="NAME", help="the metric a sweep is compared on, "
                    "METRIC or STAGE/METRIC (default: the first eval stage's first metric)")
    rp.add_argument("--out", metavar="FILE", help="the HTML file to write (default: "
                    "<store>/reports/<recipe>/<time>-report.html)")
    rp.add_argument("--json", action="store_true",
                    help="print the report's data as JSON (HTML only with --out)")
    rp.add_argument("--store", metavar="DIR", help="store root (default: $RECIPE_STORE or ./recipe_store)")

    pg = sub.add_parser("plugins", help="list installed plugin packages: components, config "
                        "groups, artifact kinds and hooks of each")
    pg.add_argument("--json", action="store_true", help="print as JSON")

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", metavar="DIR",
                        help="store root (default: $RECIPE_STORE or ./recipe_store)")
        sp.add_argument("--json", action="store_true", help="print as JSON")

    ve = sub.add_parser("verify", help="re-hash committed artifacts against their manifests; "
                        "exit 1 if any is damaged")
    ve.add_argument("targets", nargs="*", metavar="RECIPE|STAGE|FP",
                    help="a recipe .yaml, then some of its stages (default: all) and Hydra "
                    "overrides; or fingerprint prefixes (as `recipe ls` shows them)")
    ve.add_argument("--all", action="store_true", help="every artifact in the store")
    store_args(ve)

    ls = sub.add_parser("ls", help="list the store's artifacts: recipe, stage, kind, size, age "
                        "and what references them")
    store_args(ls)

    gc = sub.add_parser("gc", help="remove artifacts, work dirs and trash that no recipe index "
                        "and no recipe's last run references")
    gc.add_argument("--dry-run", action="store_true", help="list what would go and the bytes freed")
    gc.add_argument("--keep", action="append", default=[], metavar="FP_PREFIX",
                    help="also keep artifacts whose fingerprint starts so; repeatable")
    gc.add_argument("--keep-runs", type=_positive_int, default=1, metavar="N",
                    help="keep what each recipe's N most recent runs reference (default 1; the "
                    "jobs of one multirun are one run)")
    store_args(gc)
    return p


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


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
        ins = ", ".join(f"{s}<-{u if isinstance(u, str) else '+'.join(u)}"
                        for s, u in p.spec.inputs.items())
        print(f"{i:>3}. {p.name:<14} {p.status:<7} {p.spec.component.name:<18} "
              f"{p.fingerprint[:12]}  {ins}")
        for k, v in p.estimates.items():
            if k != "meta":
                print(f"       {k}: {v}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from . import config
    from .errors import Problem, RecipeError, did_you_mean
    from .funnel import funnel, render
    from .runner import compute_fingerprints
    from .safety import NAME_RE
    from .store import Store
    from .validate import validate

    pm = _plugin_manager()
    stages = [t for t in args.overrides if NAME_RE.match(t)]
    overrides = [t for t in args.overrides if not NAME_RE.match(t)]
    loaded = config.load(args.recipe, overrides, pm.config_dirs())
    recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
    unknown = [s for s in stages if s not in recipe.stages]
    if unknown:
        raise RecipeError([Problem(key=s, message=f"no stage named {s!r} in {args.recipe} "
                                   f"(stages: {', '.join(recipe.stages)})"
                                   f"{did_you_mean(s, recipe.stages)}") for s in unknown])
    store = Store(args.store)
    result = funnel(recipe, compute_fingerprints(recipe, pm), store, stages or None)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(result, detail=bool(stages)))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from . import report
    from .store import Store

    if args.metric and not args.multirun:
        print("error: --metric names what the jobs of a sweep are compared on: give -m too",
              file=sys.stderr)
        return EXIT_USAGE
    pm = _plugin_manager()
    store = Store(args.store)
    if args.multirun:
        recipes = report.expand_sweep(args.recipe, args.overrides, pm)
        data = report.for_sweep(args.recipe, [{"overrides": r.loaded.overrides} for r in recipes],
                                pm, store, metric=args.metric, recipes=recipes)
        if args.metric and data["sweep"]["stage"] is None:
            from .errors import RecipeError, did_you_mean

            names = report.metric_names(data["jobs"])
            raise RecipeError(f"no metric {args.metric!r} in the store for these jobs (metrics: "
                              f"{', '.join(names) or 'none'}){did_you_mean(args.metric, names)}")
    else:
        data = report.for_recipe(args.recipe, args.overrides, pm, store)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    if args.out or not args.json:
        path = report.write(data, Path(args.out) if args.out else report.default_path(
            store, data["recipe"], "sweep" if args.multirun else "report"))
        print(path, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _write_run_report(args: argparse.Namespace, pm: Any, store: Any, result: dict[str, Any],
                      recipes: list[Any]) -> None:
    """The HTML report at the end of a run (a multirun's: the comparison of its jobs), into
    ``<store>/reports/<recipe>/``; its path on stderr. A report that fails is a warning."""
    try:
        from . import report

        if "jobs" in result:
            data = report.for_sweep(args.recipe, result["jobs"], pm, store, recipes=recipes)
        else:
            data = report.for_recipe(args.recipe, args.overrides, pm, store, summary=result,
                                     recipe=recipes[-1] if recipes else None)
        tag = str(data.get("invocation") or uuid.uuid4().hex)[:8]
        path = report.write(data, report.default_path(store, data["recipe"], tag), latest=True)
        print(f"report: {path}", file=sys.stderr)
    except Exception as e:  # the run's own outcome stands
        print(f"warning: the run report was not written: {type(e).__name__}: {e}",
              file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from . import config
    from .progress import Progress
    from .runner import Nodes, StageFailed, format_error, run
    from .store import Store
    from .validate import validate

    nodes = Nodes.from_env()  # NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
    pm = _plugin_manager()
    store = Store(args.store)
    force, fresh = set(args.force), set(args.fresh)
    invocation = uuid.uuid4().hex[:16]  # the jobs of a multirun are one run (for `recipe gc`)

    recipes: list[Any] = []  # the jobs' recipes (those run in this process), for the report

    def job(loaded: Any) -> dict:
        recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
        recipes.append(recipe)
        progress = Progress(len(recipe.stages), enabled=not args.quiet)
        with _log_to(progress):
            return run(recipe, pm, store, force=force, until=args.until, progress=progress,
                       fresh=fresh, invocation=invocation, nodes=nodes)

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
            if nodes.rank == 0:  # a follower's run is node 0's; so is its report
                _write_run_report(args, pm, store, e.summary, recipes)
            return EXIT_FAILED
        if args.json:
            print(json.dumps(result, default=str), file=real_stdout, flush=True)
        else:
            _print_summary(result)
        if nodes.rank == 0:
            _write_run_report(args, pm, store, result, recipes)
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


# -- Slurm ----------------------------------------------------------------------------------


def sbatch_script(recipe: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
                  store: Path, job_name: str, partition: str | None = None,
                  time_limit: str | None = None, account: str | None = None,
                  workdir: Path | None = None, python: str | None = None) -> str:
    """A Slurm batch script that runs ``recipe run RECIPE OVERRIDES`` once per node (srun,
    one task per node) with NNODES, NODE_RANK (SLURM_NODEID), MASTER_ADDR (the job's first
    host) and MASTER_PORT (from the job id) set, on one store."""
    import shlex

    q = shlex.quote
    command = [python or sys.executable, "-m", "recipe_engine.cli", "run",
               str(Path(recipe).resolve()), *overrides]
    sbatch = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", "--exclusive"]
    if gpus_per_node:
        sbatch.append(f"--gpus-per-node={gpus_per_node}")
    for flag, value in (("partition", partition), ("time", time_limit), ("account", account)):
        if value:
            sbatch.append(f"--{flag}={value}")
    lines = [
        "#!/bin/bash",
        f"# {job_name}: `recipe run` of {Path(recipe).name} on {nodes} node(s), one `recipe run` "
        "per node (written by `recipe sbatch`).",
        "# Node 0 runs the data stages and commits every stage; each node starts its own "
        "processes for the",
        "# distributed (training) stages. The store must be on a file system every node "
        "mounts at the same path.",
        "# Submit with: sbatch THIS_FILE",
        *(f"#SBATCH {o}" for o in sbatch),
        "set -euo pipefail",
        f"cd {q(str(workdir or Path.cwd()))}",
        f"export RECIPE_STORE={q(str(store))}",
        'export NNODES="$SLURM_JOB_NUM_NODES"',
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        "# one task per node; NODE_RANK is each node's index in the job",
        'srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" '
        "--kill-on-bad-exit=1 \\",
        "  bash -c 'export NODE_RANK=\"$SLURM_NODEID\"; exec \"$@\"' recipe-node \\",
        "  " + " ".join(q(c) for c in command),
        "",
    ]
    return "\n".join(lines)


def cmd_sbatch(args: argparse.Namespace) -> int:
    from .store import Store

    import re

    for flag in ("partition", "time", "account", "job_name"):
        value = getattr(args, flag)
        if value is not None and not re.fullmatch(r"[\w.:,@+=/-]+", value):
            print(f"error: --{flag.replace('_', '-')} {value!r}: letters, digits and . : , @ + "
                  "= / - _ only (it goes into an #SBATCH line as it is)", file=sys.stderr)
            return EXIT_USAGE
    pm = _plugin_manager()
    recipe = _load(args, pm)  # a recipe that cannot run fails here, not in the queue
    store = Store(args.store)
    script = sbatch_script(args.recipe, list(args.overrides), nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, store=store.root,
                           job_name=args.job_name or recipe.name, partition=args.partition,
                           time_limit=args.time, account=args.account)
    if args.dry_run:
        print(script, end="")
        return EXIT_OK
    out = Path(args.out) if args.out else (
        store.root / "slurm" / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    out.chmod(0o755)
    print(f"wrote {out}; submit it with: sbatch {out}")
    return EXIT_OK


# -- the store: verify, ls, gc ------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def _where(row: dict[str, Any]) -> str:
    return f"{row.get('recipe') or '?'}/{row.get('stage') or '?'}"


def _verify_recipe(store: Any, path: str, rest: list[str]) -> list[dict[str, Any]]:
    from . import config
    from .errors import Problem, RecipeError, did_you_mean
    from .runner import compute_fingerprints
    from .safety import NAME_RE
    from .validate import validate

    pm = _plugin_manager()
    stages = [t for t in rest if NAME_RE.match(t)]
    overrides = [t for t in rest if not NAME_RE.match(t)]
    loaded = config.load(path, overrides, pm.config_dirs())
    recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
    unknown = [s for s in stages if s not in recipe.stages]
    if unknown:
        raise RecipeError([Problem(key=s, message=f"no stage named {s!r} in {path} (stages: "
                                   f"{', '.join(recipe.stages)}){did_you_mean(s, recipe.stages)}")
                           for s in unknown])
    fps = compute_fingerprints(recipe, pm)
    return [{**store.verify(fps[name]), "recipe": recipe.name, "stage": name}
            for name in stages or recipe.stages]


def cmd_verify(args: argparse.Namespace) -> int:
    import re

    from .store import Store, describe_problems

    store = Store(args.store)
    targets = list(args.targets)
    if args.all == bool(targets):
        print("error: give a recipe (recipe verify RECIPE [STAGE ...]), fingerprint prefixes, "
              "or --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    if args.all:
        rows = [store.verify(fp) for fp in store.fingerprints()]
    elif targets[0].endswith((".yaml", ".yml")) or Path(targets[0]).is_file():
        rows = _verify_recipe(store, targets[0], targets[1:])
    else:
        rows = []
        known = store.fingerprints()
        for t in targets:
            if not re.fullmatch(r"[0-9a-f]{4,64}", t):
                print(f"error: {t!r} is neither a recipe file nor a fingerprint prefix (four or "
                      "more hex digits)", file=sys.stderr)
                return EXIT_USAGE
            rows += [store.verify(fp) for fp in known if fp.startswith(t)] or [store.verify(t)]
    damaged = [r for r in rows if r["status"] == "damaged"]
    if args.json:
        print(json.dumps({"store": str(store.root), "ok": not damaged, "artifacts": rows},
                         indent=2, default=str))
        return EXIT_FAILED if damaged else EXIT_OK
    width = max([len(_where(r)) for r in rows] + [5])
    for r in rows:
        what = (f"{r['files']} file{'s' * (r['files'] != 1)}, {_size(r['bytes'])}"
                if r["status"] != "absent" else "not committed")
        status = "DAMAGED" if r["status"] == "damaged" else r["status"]
        print(f"{status:<8} {r['fingerprint'][:12]:<12}  {_where(r):<{width}}  {what}")
        for p in r["problems"]:
            print(f"{'':<24}{describe_problems([p])}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "damaged", "absent")}
    print(f"{len(rows)} artifacts: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"  (store {store.root})")
    if damaged:
        print(f"error: {len(damaged)} damaged; a run recomputes them (a damaged artifact is "
              "never reused)", file=sys.stderr)
    return EXIT_FAILED if damaged else EXIT_OK


def _tags(reasons: list[str]) -> str:
    tags = []
    for r in reasons:
        tag = ("index" if r.startswith("index") else "live" if r.startswith("live")
               else "last-run" if r.startswith("last") else "run")
        if tag not in tags:
            tags.append(tag)
    return ",".join(tags) or "-"


def cmd_ls(args: argparse.Namespace) -> int:
    from .store import Store

    store = Store(args.store)
    listing = store.listing()
    for e in listing["errors"]:
        print(f"warning: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return EXIT_OK
    cols = ("FINGERPRINT", "RECIPE", "STAGE", "COMPONENT", "KIND", "SIZE", "AGE", "REFERENCED")
    rows = [(a["fingerprint"][:12], a["recipe"] or "?", a["stage"] or "?", a["component"] or "?",
             a["kind"] or "?", _size(a["bytes"]), _age(a["age"]),
             _tags(a["referenced_by"]) + ("" if a["manifest"] == "ok" else f"  ({a['manifest']})"))
            for a in sorted(listing["artifacts"], key=lambda a: (str(a["recipe"]),
                                                                 str(a["stage"]), a["age"]))]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols[:-1])]
    for r in [cols, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    work = listing["work"]
    print(f"{len(rows)} artifacts, {_size(sum(a['bytes'] for a in listing['artifacts']))}; "
          f"{len(work)} work dirs, {_size(sum(w['bytes'] for w in work))}; trash "
          f"{_size(listing['trash_bytes'])}; total {_size(listing['bytes'])}  (store {store.root})")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from .store import Store

    if any(not k for k in args.keep):
        print("error: --keep takes a fingerprint prefix, not an empty string", file=sys.stderr)
        return EXIT_USAGE
    store = Store(args.store)
    result = store.gc(keep=args.keep, keep_runs=args.keep_runs, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    if result["errors"]:
        for e in result["errors"]:
            print(f"error: {e}", file=sys.stderr)
        print("error: gc removes nothing while the store's references cannot all be read; fix "
              "or remove the files above", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for a in result["artifacts"]:
        print(f"{verb}  {a['fingerprint'][:12]}  {_where(a)}  {_size(a['bytes'])}")
    for w in result["work"]:
        print(f"{verb}  work/{w['fingerprint'][:12]}  {_size(w['bytes'])}")
    for b in result["busy"]:
        print(f"busy (in use by a run; kept)  {b['in']}/{b['fingerprint'][:12]}")
    print(f"{'would free' if args.dry_run else 'freed'} {_size(result['freed_bytes'])}: "
          f"{len(result['artifacts'])} artifacts, {len(result['work'])} work dirs, trash "
          f"{_size(result['trash_bytes'])}; kept {result['kept']} referenced artifacts"
          f"  (store {store.root})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`recipe run r.yaml --json a=1`): keep them, in order
    flags = [a for a in extra if a.startswith("-")]
    rest = next((d for d in ("overrides", "targets") if hasattr(args, d)), None)
    if flags or (extra and not rest):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        setattr(args, rest, list(getattr(args, rest)) + extra)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from .errors import RecipeError

    try:
        return {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
                "plugins": cmd_plugins, "verify": cmd_verify, "ls": cmd_ls,
                "gc": cmd_gc, "show": cmd_show, "report": cmd_report,
                "sbatch": cmd_sbatch}[args.command](args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        from .runner import DISK_FULL_HINT, disk_full

        if not disk_full(e):
            raise
        print(f"error: {e} ({DISK_FULL_HINT})", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; finished stages stay committed, the running one resumes next time",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
