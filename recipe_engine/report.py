"""The run report: one run, or the jobs of a sweep, at a glance, as one static HTML file
(``recipe report``, and ``<store>/reports/<recipe>/<time>-<invocation>.html`` at the end of
every ``recipe run``).

The report is made from the store alone: each stage's committed artifact (the current
fingerprint, else the one the recipe's index recorded last: ``earlier``) and, for a report
written by a run, that run's summary (statuses ``ran`` / ``cached`` / ``failed``). It reads:

* every manifest: status, compute time, headline metrics, parameters; the data funnel is
  :func:`recipe_engine.funnel.funnel`'s;
* ``metrics.jsonl`` in any committed artifact (a training stage's curves): one JSON object a
  line, ``{"step": int, "tokens": int, "loss": float, "lr": float, "tokens_per_second":
  float, ...}``; every other finite number is a curve over ``step`` (``val_loss`` beside
  ``loss``, in-loop evaluation as ``eval/<task>/<metric>``); a later line for the same step
  replaces an earlier one (a resumed run logs the steps after its checkpoint again);
* ``eval_report`` artifacts through :func:`recipe_engine.artifacts.read_eval_report`:
  ``<task>/<metric>`` with ``<task>/<metric>_stderr`` beside it;
* ``samples.json`` in any committed artifact (generation samples, an export's): a JSON list
  of ``{"prompt": str, "completion": str, ...}`` (other scalar keys shown with them), or an
  object ``{"samples": [...], "settings": {...}}``.

Unreadable or malformed files are listed under "problems" in the report, never fatal. The
HTML is self-contained: inline CSS, inline SVG plots drawn here, a few lines of inline
JavaScript (sortable tables); nothing is fetched. Everything from a recipe or an artifact is
HTML-escaped. Standard library only.
"""
from __future__ import annotations

import html
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from .funnel import funnel
from .store import Store

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.json"
EVAL_KIND = "eval_report"
MAX_POINTS = 1000  # per curve: longer ones are thinned evenly (first and last points kept)
MAX_SAMPLES = 20
MAX_SAMPLE_CHARS = 2000
X_KEYS = ("step", "tokens", "epoch", "time", "seconds", "elapsed")  # not plotted as curves
HEADLINE = 4
OWN = ("ran", "cached", "done")  # statuses of a stage whose artifact has its own fingerprint


# -- reading the store ---------------------------------------------------------------------


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _numbers(d: Any) -> dict[str, float]:
    return {str(k): v for k, v in (d or {}).items() if _number(v)} if isinstance(d, dict) else {}


def headline(metrics: dict[str, Any], n: int = HEADLINE) -> dict[str, Any]:
    """The first ``n`` numeric metrics, timings, counts and stderrs left out."""
    return dict([(k, v) for k, v in _numbers(metrics).items()
                 if k != "seconds" and not k.endswith("_stderr")
                 and not k.split("/")[-1].startswith("num_")][:n])


def read_curves(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """``metrics.jsonl`` -> ``{"records", "skipped", "series": {key: [[step, value], ...]},
    "num_points": {key: n}}``; malformed lines are counted in ``skipped``."""
    by_key: dict[str, dict[int, float]] = {}
    records = skipped = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    skipped += 1
                    continue
                step = obj.get("step") if isinstance(obj, dict) else None
                if not isinstance(step, int) or isinstance(step, bool):
                    skipped += 1
                    continue
                records += 1
                for k, v in obj.items():
                    if k not in X_KEYS and _number(v):
                        by_key.setdefault(str(k), {})[step] = float(v)
    except OSError as e:
        problems.append(f"{path}: unreadable ({e})")
        return None
    if skipped:
        problems.append(f"{path}: {skipped} line(s) without a JSON object with an integer "
                        "`step` skipped")
    series, counts = {}, {}
    for k, points in by_key.items():
        pts = sorted(points.items())
        counts[k] = len(pts)
        series[k] = [[s, v] for s, v in _thin(pts, MAX_POINTS)]
    return {"records": records, "skipped": skipped, "series": series, "num_points": counts}


def _thin(points: list[Any], limit: int) -> list[Any]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    out = points[::stride]
    return out if out[-1] is points[-1] else out + [points[-1]]


def read_samples(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """``samples.json`` -> ``{"samples": [{"prompt", "completion", "extra"}], "total",
    "settings"}`` (at most ``MAX_SAMPLES``, texts cut at ``MAX_SAMPLE_CHARS``)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None
    settings = {}
    if isinstance(obj, dict):
        settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else {}
        obj = obj.get("samples")
    if not isinstance(obj, list):
        problems.append(f"{path}: not a list of samples (nor {{\"samples\": [...]}})")
        return None
    out, bad = [], 0
    for s in obj:
        if not isinstance(s, dict) or not isinstance(s.get("prompt", ""), str) or \
                not isinstance(s.get("completion", ""), str):
            bad += 1
            continue
        if len(out) < MAX_SAMPLES:
            out.append({"prompt": s.get("prompt", "")[:MAX_SAMPLE_CHARS],
                        "completion": s.get("completion", "")[:MAX_SAMPLE_CHARS],
                        "extra": {str(k): v for k, v in s.items()
                                  if k not in ("prompt", "completion")
                                  and isinstance(v, (str, int, float, bool))}})
    if bad:
        problems.append(f"{path}: {bad} sample(s) that are not objects with string "
                        "`prompt` and `completion` skipped")
    return {"samples": out, "total": len(obj) - bad,
            "settings": {str(k): v for k, v in settings.items()
                         if isinstance(v, (str, int, float, bool))}}


def eval_rows(metrics: dict[str, Any], results: Any = None) -> list[dict[str, Any]]:
    """A flat eval metrics map as table rows: ``task`` (the part before the first ``/``),
    ``metric``, ``value``, ``stderr`` (from ``<name>_stderr``), ``n_shot`` (lm-eval's)."""
    nums = _numbers(metrics)
    n_shot = results.get("n-shot") if isinstance(results, dict) else None
    rows = []
    for key, value in nums.items():
        if key.endswith("_stderr") and key.removesuffix("_stderr") in nums:
            continue
        task, _, metric = key.partition("/") if "/" in key else ("", "", key)
        shots = n_shot.get(task) if isinstance(n_shot, dict) else None
        rows.append({"name": key, "task": task, "metric": metric, "value": value,
                     "stderr": nums.get(key + "_stderr"),
                     "n_shot": shots if _number(shots) else None})
    return rows


def collect(recipe: Any, store: Store, fingerprints: dict[str, str],
            summary: dict[str, Any] | None = None,
            overrides: Iterable[str] = ()) -> dict[str, Any]:
    """What the report shows of one run of ``recipe`` (JSON-able; ``recipe report --json``).
    ``summary``: the run's summary, when a run writes its report."""
    problems: list[str] = []
    try:
        index = store.index(recipe.name)
    except (OSError, ValueError) as e:
        index = {}
        problems.append(f"the store's index of {recipe.name!r} is unreadable ({e})")
    in_run = {s.get("name"): s for s in (summary or {}).get("stages", []) if isinstance(s, dict)}
    stages, curves, evals, samples = [], [], [], []
    for name, spec in recipe.stages.items():
        entry = in_run.get(name)
        fp = (entry or {}).get("fingerprint") or fingerprints[name]
        status = entry["status"] if entry else "done"
        found = store.lookup(fp, report=False) if status != "failed" else None
        if found is None and entry is None:
            earlier = index.get(name)
            if isinstance(earlier, str) and earlier != fp:
                found = store.lookup(earlier, report=False)
            if found is not None:
                fp, status = earlier, "earlier"
            else:
                status = "not run"
        manifest = found.manifest if found else {}
        seconds = manifest.get("seconds", (entry or {}).get("seconds"))
        metrics = _numbers(manifest.get("metrics") if found else (entry or {}).get("metrics"))
        stages.append({
            "name": name, "component": spec.component.name, "kind": spec.component.output,
            "inputs": spec.upstreams(), "fingerprint": fp, "status": status,
            "seconds": seconds if _number(seconds) else None,
            "run_seconds": (entry or {}).get("seconds"),
            "started_at": manifest.get("started_at"), "resumed": manifest.get("resumed"),
            "artifact": str(found.path) if found else None,
            "metrics": metrics, "headline": headline(metrics),
            "params": manifest.get("params", spec.recorded_params),
            "error": (entry or {}).get("error"),
        })
        if found is None:
            continue
        path = Path(found.path)
        if (path / METRICS_FILE).is_file():
            c = read_curves(path / METRICS_FILE, problems)
            if c and c["series"]:
                curves.append({"stage": name, **c})
        if (path / SAMPLES_FILE).is_file():
            s = read_samples(path / SAMPLES_FILE, problems)
            if s and s["samples"]:
                samples.append({"stage": name, **s})
        if found.kind == EVAL_KIND or spec.component.output == EVAL_KIND:
            evals.append(_eval(name, spec.component.name, found, problems))
    try:
        data_funnel = funnel(recipe, fingerprints, store)["stages"]
    except Exception as e:  # a report never fails on one of its parts
        data_funnel = []
        problems.append(f"the data funnel could not be read ({type(e).__name__}: {e})")
    return {"recipe": recipe.name, "store": str(store.root), "overrides": list(overrides),
            "invocation": (summary or {}).get("invocation"),
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "stages": stages, "funnel": data_funnel, "curves": curves, "evals": evals,
            "samples": samples, "problems": problems}


def _eval(name: str, component: str, found: Any, problems: list[str]) -> dict[str, Any]:
    from .artifacts import read_eval_report

    try:
        report = read_eval_report(found.path)
    except (OSError, ValueError) as e:
        problems.append(f"{found.path}: eval report unreadable ({type(e).__name__}: {e})")
        report = {"metrics": {}}
    metrics = _numbers(report.get("metrics"))
    if not metrics:  # a producer that published no meta: its manifest's metrics
        metrics = {k: v for k, v in _numbers(found.manifest.get("metrics")).items()
                   if k != "seconds"}
    return {"stage": name, "component": component, "metrics": metrics,
            "rows": eval_rows(metrics, report.get("results"))}


# -- a sweep: the jobs of a multirun -------------------------------------------------------


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def pick_metric(jobs: list[dict[str, Any]], wanted: str | None = None) -> tuple[str, str] | None:
    """(stage, metric) a sweep is compared on: ``wanted`` (``METRIC`` or ``STAGE/METRIC``;
    eval stages are searched first, then every stage's metrics), else the first metric of
    the first eval stage that any job has."""
    def candidates() -> Iterable[tuple[str, dict[str, Any]]]:
        for job in jobs:
            for e in job.get("evals", []):
                yield e["stage"], e["metrics"]
        for job in jobs:
            for s in job.get("stages", []):
                yield s["name"], s["metrics"]

    if wanted:
        for stage, metrics in candidates():
            if wanted in metrics:
                return stage, wanted
            head, _, rest = wanted.partition("/")
            if head == stage and rest in metrics:
                return stage, rest
        return None
    for job in jobs:
        for e in job.get("evals", []):
            first = headline(e["metrics"], 1)
            if first:
                return e["stage"], next(iter(first))
    return None


def metric_names(jobs: list[dict[str, Any]]) -> list[str]:
    """Every name ``--metric`` accepts for these jobs: eval metrics first, then stages'."""
    names: list[str] = []
    for job in jobs:
        for e in job.get("evals", []):
            names += [k for k in e["metrics"] if k not in names]
    for job in jobs:
        for s in job.get("stages", []):
            names += [f"{s['name']}/{k}" for k in s["metrics"] if f"{s['name']}/{k}" not in names]
    return names


def compare(jobs: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any]:
    """The comparison of a sweep's jobs (each a :func:`collect` result with its overrides):
    the swept parameters (the override keys whose values differ between jobs), the metric
    compared (:func:`pick_metric`) and one row per job."""
    params = [dict(_split_override(o) for o in job.get("overrides", [])) for job in jobs]
    keys: list[str] = []
    for p in params:
        keys += [k for k in p if k not in keys]
    swept = [k for k in keys if len({p.get(k) for p in params}) > 1] or keys
    chosen = pick_metric(jobs, metric)
    rows = []
    for i, (job, p) in enumerate(zip(jobs, params), 1):
        statuses = [s["status"] for s in job.get("stages", [])]
        status = ("failed" if "failed" in statuses or job.get("error") else
                  "incomplete" if any(s in ("not run", "earlier") for s in statuses) else "done")
        # only this job's own artifacts: not an earlier configuration's (another job's)
        own = {s["name"] for s in job.get("stages", []) if s["status"] in OWN}
        value = None
        if chosen:
            stage, name = chosen
            for source in [e["metrics"] for e in job.get("evals", []) if e["stage"] == stage] + \
                    [s["metrics"] for s in job.get("stages", []) if s["name"] == stage]:
                if name in source and stage in own:
                    value = source[name]
                    break
        others = {f"{e['stage']}/{k}": v for e in job.get("evals", []) if e["stage"] in own
                  for k, v in headline(e["metrics"], 3).items()}
        rows.append({"job": i, "overrides": job.get("overrides", []),
                     "params": {k: p.get(k) for k in swept}, "status": status,
                     "value": value, "metrics": others, "error": job.get("error")})
    return {"parameters": swept, "stage": chosen[0] if chosen else None,
            "metric": chosen[1] if chosen else metric, "jobs": rows}


def expand_sweep(path: str, overrides: list[str], pm: Any) -> list[Any]:
    """The validated recipes of the jobs ``recipe run -m`` would run (Hydra's sweeper expands
    the overrides, its basic launcher composes each job in this process; nothing runs)."""
    from . import config
    from .validate import validate

    recipes: list[Any] = []

    def job(loaded: Any) -> dict[str, Any]:
        recipes.append(validate(loaded, pm.registry, pm.hook.recipe_default_executor()))
        return {}

    with tempfile.TemporaryDirectory(prefix="recipe-report-") as tmp:
        mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra/launcher=")]
        results = config.multirun(path, mine + ["hydra/launcher=basic"],
                                  pm.config_dirs(), Path(tmp) / "sweep", job)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        from .errors import RecipeError

        raise RecipeError(errors[0])
    return recipes


def for_recipe(path: str, overrides: list[str], pm: Any, store: Store,
               summary: dict[str, Any] | None = None, recipe: Any = None) -> dict[str, Any]:
    """Compose ``path`` with ``overrides`` (unless ``recipe`` is given) and :func:`collect`
    its report; fingerprints from ``summary`` where it has them, computed otherwise."""
    from . import config
    from .runner import compute_fingerprints
    from .validate import validate

    if recipe is None:
        loaded = config.load(path, overrides, pm.config_dirs())
        recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
    fps = {s["name"]: s["fingerprint"] for s in (summary or {}).get("stages", [])
           if isinstance(s, dict) and s.get("fingerprint")}
    if set(recipe.stages) - set(fps):
        fps = {**compute_fingerprints(recipe, pm), **fps}
    return collect(recipe, store, fps, summary, overrides)


def for_sweep(path: str, jobs: list[dict[str, Any]], pm: Any, store: Store,
              metric: str | None = None, recipes: Iterable[Any] = ()) -> dict[str, Any]:
    """The report of a sweep: each job (``{"overrides": [...]}``, with the job's run summary
    when a run writes it) collected, and their comparison. A job's recipe is taken from
    ``recipes`` (validated recipes whose overrides are the job's), else composed again."""
    known = {tuple(r.loaded.overrides): r for r in recipes}
    collected = []
    for job in jobs:
        overrides = list(job.get("overrides", []))
        summary = job if job.get("stages") else None
        try:
            data = for_recipe(path, overrides, pm, store, summary, known.get(tuple(overrides)))
        except Exception as e:  # one job's recipe that does not compose: a row, not a failure
            data = {"recipe": Path(path).stem, "overrides": overrides, "stages": [],
                    "funnel": [], "curves": [], "evals": [], "samples": [],
                    "problems": [f"{type(e).__name__}: {e}"]}
        if job.get("error"):
            data["error"] = job["error"]
        collected.append(data)
    name = next((j["recipe"] for j in collected if j.get("stages")), Path(path).stem)
    return {"recipe": name, "store": str(store.root),
            "invocation": next((j.get("invocation") for j in jobs if j.get("invocation")), None),
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "sweep": compare(collected, metric), "jobs": collected}


def default_path(store: Store, recipe: str, tag: str) -> Path:
    return store.root / "reports" / recipe / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}.html"


def write(data: dict[str, Any], path: Path, latest: bool = False) -> Path:
    """Write the HTML of ``data`` to ``path`` (atomically); with ``latest``, also as
    ``latest.html`` beside it."""
    from .fsutil import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render(data)
    atomic_write_text(path, page)
    if latest:
        atomic_write_text(path.parent / "latest.html", page)
    return path


# -- SVG -------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22")
STATUS_COLORS = {"ran": "#c8e6c9", "cached": "#d6e4f0", "done": "#d6e4f0",
                 "failed": "#f8c9c4", "earlier": "#fbe3b0", "not run": "#eeeeee"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if span / (m * mag) <= n)
    first = math.ceil(lo / step - 1e-9)
    return [(first + i) * step for i in range(int((hi - first * step) / step + 1e-9) + 1)]


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def svg_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], *,
              x_label: str = "step", y_label: str = "", x_labels: list[str] | None = None,
              log_x: bool = False, width: int = 560, height: int = 260) -> str:
    """A line chart: one polyline per series (``data-points``: its number of points), a
    circle with a tooltip at each point of a short series; ``x_labels``: a categorical
    axis (x = 0, 1, ... are the labels' positions); ``log_x``: a log10 axis."""
    left, right, top, bottom = 64, 16, 26, 42
    pw, ph = width - left - right, height - top - bottom
    series = [(n, [(x, y) for x, y in pts if _number(x) and _number(y)
                   and (not log_x or x > 0)]) for n, pts in series]
    series = [(n, pts) for n, pts in series if pts]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>",
           f'<text x="{left}" y="16" class="title">{_e(title)}</text>']
    if not series:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>'
                   "</svg>")
        return "".join(out)

    def tx(x: float) -> float:
        return math.log10(x) if log_x else x

    xs = [tx(x) for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    if x_labels is not None:
        x0, x1 = -0.5, len(x_labels) - 0.5
    else:
        x0, x1 = (min(xs), max(xs)) if min(xs) < max(xs) else _range(xs)
    y0, y1 = _range(ys)

    def px(x: float) -> float:
        return round(left + (tx(x) - x0) / (x1 - x0) * pw, 2)

    def py(y: float) -> float:
        return round(top + (y1 - y) / (y1 - y0) * ph, 2)

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for t in _ticks(y0, y1):
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{_e(fmt(t))}</text>')
    if x_labels is not None:
        xticks = [(float(i), lab) for i, lab in enumerate(x_labels)]
    elif log_x:
        lo, hi = math.floor(x0), math.ceil(x1)
        xticks = [(10.0 ** k, fmt(10.0 ** k)) for k in range(lo, hi + 1) if x0 <= k <= x1]
        if len(xticks) < 2:
            xticks = [(x, fmt(x)) for x in sorted({x for _, p in series for x, _ in p})]
    else:
        xticks = [(t, fmt(t)) for t in _ticks(x0, x1)]
    for t, lab in xticks:
        x = px(t)
        out.append(f'<line x1="{x}" x2="{x}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>'
                   f'<text x="{x}" y="{top + ph + 16}" text-anchor="middle">{_e(lab)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" '
               f'class="label">{_e(x_label)}</text>')
    if y_label:
        out.append(f'<text transform="translate(12 {top + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle" class="label">{_e(y_label)}</text>')
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x)},{py(y)}" for x, y in pts)
        out.append(f'<polyline class="series" data-series="{_e(name)}" data-points="{len(pts)}"'
                   f' points="{coords}" stroke="{color}" fill="none" stroke-width="1.6"/>')
        if len(pts) <= 60:
            for x, y in pts:
                xl = x_labels[int(x)] if x_labels is not None else fmt(x)
                out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="2.6" fill="{color}">'
                           f"<title>{_e(name)}: {_e(fmt(y))} at {_e(x_label)} {_e(xl)}"
                           "</title></circle>")
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{COLORS[i % len(COLORS)]}">'
                     f"</i>{_e(n)}</span>" for i, (n, _) in enumerate(series))
    return "".join(out) + (f'<div class="legend">{legend}</div>' if len(series) > 1 else "")


def svg_graph(stages: list[dict[str, Any]]) -> str:
    """The stage graph, top to bottom: a row per depth (the longest path from a source), a
    box per stage coloured by status, an edge per input."""
    depth: dict[str, int] = {}
    for s in stages:  # stages come in run order: upstreams first
        depth[s["name"]] = 1 + max([depth.get(u, -1) for u in s["inputs"]] or [-1])
    rows: dict[int, list[str]] = {}
    for s in stages:
        rows.setdefault(depth[s["name"]], []).append(s["name"])
    bw, bh, gx, gy = 150, 40, 16, 22
    widest = max((len(v) for v in rows.values()), default=1)
    width = 20 + widest * (bw + gx) - gx
    pos = {}
    for d, names in rows.items():
        offset = (width - 20 - len(names) * (bw + gx) + gx) / 2  # each row centred
        for i, n in enumerate(names):
            pos[n] = (10 + offset + i * (bw + gx), 10 + d * (bh + gy))
    height = 20 + (max(rows, default=0) + 1) * (bh + gy) - gy
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" role="img" aria-label="stage graph">']
    for s in stages:
        x2, y2 = pos[s["name"]]
        for u in s["inputs"]:
            if u in pos:
                x1, y1 = pos[u]
                a, b, c, d = x1 + bw / 2, y1 + bh, x2 + bw / 2, y2
                out.append(f'<path class="edge" d="M{a},{b} C{a},{b + gy} {c},{d - gy} {c},{d}"/>')
    for s in stages:
        x, y = pos[s["name"]]
        color = STATUS_COLORS.get(s["status"], "#eeeeee")
        time_text = f" · {s['seconds']:.1f}s" if s["seconds"] is not None else ""
        tip = "; ".join([f"{s['component']} -> {s['kind']}"] +
                        [f"{k}={fmt(v)}" for k, v in s["headline"].items()])
        out.append(f'<g class="node" data-stage="{_e(s["name"])}" data-status="{_e(s["status"])}">'
                   f"<title>{_e(s['name'])}: {_e(tip)}</title>"
                   f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="{color}"/>'
                   f'<text x="{x + 8}" y="{y + 16}" class="name">{_e(s["name"][:22])}</text>'
                   f'<text x="{x + 8}" y="{y + 32}">{_e(s["status"])}{_e(time_text)}</text></g>')
    out.append("</svg>")
    return "".join(out)


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#666}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.n{text-align:right;
font-variant-numeric:tabular-nums}table.sortable th{cursor:pointer}
.status{padding:1px 6px;border-radius:4px;white-space:nowrap}.s-ran{background:#c8e6c9}
.s-cached,.s-done{background:#d6e4f0}.s-failed{background:#f8c9c4}.s-earlier{background:#fbe3b0}
.s-not-run,.s-incomplete{background:#eee}.bar{background:#9ecae1;height:10px}
.barbox{width:160px;background:#f0f0f0}svg text{font:11px system-ui,sans-serif;fill:#333}
svg .title{font-size:13px;font-weight:600}svg .frame{fill:none;stroke:#bbb}
svg .grid{stroke:#eee}svg .axis{stroke:#999}svg .edge{fill:none;stroke:#888;stroke-width:1.4}
svg .node rect{stroke:#777}svg .node .name{font-weight:600}.charts{display:flex;
flex-wrap:wrap;gap:12px}figure{margin:0}.legend{font-size:12px}.key{margin-right:12px}.key i{
display:inline-block;width:10px;height:10px;margin-right:4px}pre{background:#f7f7f7;
padding:6px;white-space:pre-wrap;margin:2px 0}pre.prompt{color:#555}.err{color:#a00}
details{margin:4px 0}.graphbox{overflow-x:auto}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var up = th.dataset.order !== 'asc';
    th.dataset.order = up ? 'asc' : 'desc';
    var key = function (tr) {
      var td = tr.children[col];
      var v = td && td.dataset.v !== undefined ? parseFloat(td.dataset.v) : NaN;
      return isNaN(v) ? (td ? td.textContent : '') : v;
    };
    Array.prototype.slice.call(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y
        : String(x).localeCompare(String(y));
      return up ? c : -c;
    }).forEach(function (tr) { body.appendChild(tr); });
  });
});
"""


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any) -> str:
    if _number(value):
        return f'<td class="n" data-v="{_e(repr(value))}">{_e(fmt(value))}</td>'
    return f"<td>{_e('-' if value is None else value)}</td>"


def _status(status: str) -> str:
    return f'<span class="status s-{_e(status.replace(" ", "-"))}">{_e(status)}</span>'


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in metrics.items())


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{_e(sid)}"><h2>{_e(title)}</h2>{body}</section>'


def _graph_section(data: dict[str, Any], p: str) -> str:
    rows = []
    for s in data["stages"]:
        detail = (f"<details><summary>params, all metrics</summary><pre>"
                  f"{_e(json.dumps(s['params'], indent=1, default=str))}</pre><pre>"
                  f"{_e(_metrics_text(s['metrics']) or '(no metrics)')}</pre>"
                  f"<div class=\"meta\">{_e(s['fingerprint'][:16])}"
                  f"{' · resumed' if s.get('resumed') else ''}"
                  f"{' · ' + _e(s['started_at']) if s.get('started_at') else ''}</div></details>")
        err = f'<div class="err">{_e(s["error"])}</div>' if s.get("error") else ""
        rows.append([f"<td>{_e(s['name'])}</td>", f"<td>{_e(s['component'])}</td>",
                     f"<td>{_e(s['kind'])}</td>", f"<td>{_e(', '.join(s['inputs']) or '-')}</td>",
                     f"<td>{_status(s['status'])}</td>",
                     _td(round(s["seconds"], 2) if s["seconds"] is not None else None),
                     f"<td>{_e(_metrics_text(s['headline']))}{err}{detail}</td>"])
    table = _table(["stage", "component", "output", "inputs", "status", "seconds",
                    "headline metrics"], rows, "stages")
    return _section(p + "graph", "Stages",
                    f'<div class="graphbox">{svg_graph(data["stages"])}</div>{table}')


def _funnel_section(data: dict[str, Any], p: str) -> str:
    rows_data = data.get("funnel") or []
    if not rows_data:
        return _section(p + "funnel", "Data funnel", "<p>No data stages.</p>")
    top = max([r["documents_in"] or 0 for r in rows_data] +
              [r["documents_out"] or 0 for r in rows_data] + [1])
    rows = []
    for r in rows_data:
        n = r["documents_out"]
        bar = "" if n is None else (f'<div class="barbox"><div class="bar" '
                                    f'style="width:{100 * n / top:.1f}%"></div></div>')
        reasons = ", ".join(f"{x['reason']} {x['count']:,}" for x in r["reasons"][:5])
        if len(r["reasons"]) > 5:
            reasons += f", ... {len(r['reasons']) - 5} more"
        langs = ", ".join(f"{k} {v:,}" for k, v in list(r["languages"].items())[:5])
        kept = None if r["kept_fraction"] is None else f"{100 * r['kept_fraction']:.1f}%"
        status = "done" if r["status"] == "current" else r["status"]  # the stages' word
        rows.append([f"<td>{_e(r['stage'])}</td>", f"<td>{_status(status)}</td>",
                     _td(r["documents_in"]), _td(r["documents_out"]), f"<td>{bar}</td>",
                     f'<td class="n">{_e(kept or "-")}</td>', _td(r["bytes_in"]),
                     _td(r["bytes_out"]), f"<td>{_e(reasons or '-')}</td>",
                     f"<td>{_e(langs or '-')}</td>"])
    return _section(p + "funnel", "Data funnel", _table(
        ["stage", "status", "docs in", "docs out", "", "kept", "bytes in", "bytes out",
         "drop reasons", "languages"], rows, "funnel"))


def _curve_groups(series: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(title, y label, keys) per chart: every loss together, lr, tokens/s, one chart per
    in-loop evaluation task (``eval/<task>/<metric>``: its scores together, standard errors
    and counts left out), then one chart per other key."""
    keys = [k for k in series if not (k.startswith("eval/") and
                                      (k.endswith("_stderr") or k.endswith("/num_samples")))]
    groups = [("loss", "loss", [k for k in keys if k.split("/")[-1].endswith("loss")]),
              ("learning rate", "lr", [k for k in keys if k in ("lr", "learning_rate")]),
              ("tokens/s", "tokens/s", [k for k in keys if k == "tokens_per_second"])]
    used = {k for _, _, ks in groups for k in ks}
    tasks: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split("/")
        if k not in used and parts[0] == "eval" and len(parts) >= 3:
            tasks.setdefault("/".join(parts[1:-1]), []).append(k)
    groups += [(f"in-loop eval: {task}", "score", ks) for task, ks in tasks.items()]
    used |= {k for ks in tasks.values() for k in ks}
    groups += [(k, k, [k]) for k in keys if k not in used]
    return [g for g in groups if g[2]]


def _curves_section(data: dict[str, Any], p: str) -> str:
    if not data.get("curves"):
        return _section(p + "curves", "Training curves",
                        f"<p>No curves: no committed artifact holds a {METRICS_FILE}.</p>")
    parts = []
    for c in data["curves"]:
        charts = [svg_chart(title, [(k, [tuple(pt) for pt in c["series"][k]]) for k in keys],
                            y_label=label) for title, label, keys in _curve_groups(c["series"])]
        thinned = [k for k, n in c["num_points"].items() if n > len(c["series"][k])]
        note = (f'<p class="meta">{c["records"]:,} records' +
                (f"; {_e(', '.join(thinned))} thinned to {MAX_POINTS} points" if thinned else "")
                + "</p>")
        parts.append(f"<h3>{_e(c['stage'])}</h3>{note}<div class=\"charts\">"
                     + "".join(f"<figure>{ch}</figure>" for ch in charts) + "</div>")
    return _section(p + "curves", "Training curves", "".join(parts))


def _evals_section(data: dict[str, Any], p: str) -> str:
    if not data.get("evals"):
        return _section(p + "evals", "Evaluation", "<p>No evaluation stage in the store.</p>")
    parts = []
    for e in data["evals"]:
        shots = any(r["n_shot"] is not None for r in e["rows"])
        rows = [[f"<td>{_e(r['task'] or '-')}</td>", f"<td>{_e(r['metric'])}</td>",
                 _td(r["value"]), _td(r["stderr"])] + ([_td(r["n_shot"])] if shots else [])
                for r in e["rows"]]
        head = ["task", "metric", "value", "± stderr"] + (["n-shot"] if shots else [])
        parts.append(f"<h3>{_e(e['stage'])} <span class=\"meta\">({_e(e['component'])})</span>"
                     f"</h3>" + (_table(head, rows, "eval sortable") if rows else
                                 "<p>No metrics.</p>"))
    return _section(p + "evals", "Evaluation", "".join(parts))


def _samples_section(data: dict[str, Any], p: str) -> str:
    if not data.get("samples"):
        return _section(p + "samples", "Generation samples",
                        f"<p>No samples: no committed artifact holds a {SAMPLES_FILE}.</p>")
    parts = []
    for s in data["samples"]:
        settings = _metrics_text(s["settings"]) if s["settings"] else ""
        shown = f"{len(s['samples'])} of {s['total']}" if s["total"] > len(s["samples"]) \
            else f"{s['total']}"
        items = "".join(
            f'<div class="sample"><pre class="prompt">{_e(x["prompt"])}</pre>'
            f'<pre class="completion">{_e(x["completion"])}</pre>'
            + (f'<div class="meta">{_e(_metrics_text(x["extra"]))}</div>' if x["extra"] else "")
            + "</div>" for x in s["samples"])
        parts.append(f"<h3>{_e(s['stage'])}</h3><p class=\"meta\">{_e(shown)} samples"
                     f"{'; ' + _e(settings) if settings else ''}</p>{items}")
    return _section(p + "samples", "Generation samples", "".join(parts))


def _problems_section(data: dict[str, Any], p: str) -> str:
    if not data.get("problems"):
        return ""
    items = "".join(f"<li>{_e(x)}</li>" for x in data["problems"])
    return _section(p + "problems", "Problems", f"<ul class=\"err\">{items}</ul>")


def render_run(data: dict[str, Any], prefix: str = "") -> str:
    """The sections of one run (ids prefixed with ``prefix``)."""
    return "".join(f(data, prefix) for f in (_graph_section, _funnel_section, _curves_section,
                                             _evals_section, _samples_section,
                                             _problems_section))


def _sweep_section(data: dict[str, Any]) -> str:
    sweep = data["sweep"]
    params, metric = sweep["parameters"], sweep["metric"]
    others: list[str] = []
    for r in sweep["jobs"]:
        others += [k for k in r["metrics"] if k not in others and
                   k != f"{sweep['stage']}/{metric}"]
    rows = [[_td(r["job"])] + [_td(_as_number(r["params"].get(k))) for k in params]
            + [f"<td>{_status(r['status'])}</td>", _td(r["value"])]
            + [_td(r["metrics"].get(k)) for k in others] for r in sweep["jobs"]]
    label = f"{sweep['stage']}/{metric}" if sweep["stage"] else (metric or "(no metric)")
    table = _table(["job", *params, "status", label, *others], rows, "sweep sortable")
    chart = ""
    if params and any(r["value"] is not None for r in sweep["jobs"]):
        chart = _sweep_chart(sweep, label)
    note = "" if sweep["stage"] else \
        '<p class="meta">No eval metric found in the store for these jobs.</p>'
    return _section("sweep", "Sweep", f"{note}{table}<figure>{chart}</figure>")


def _as_number(text: Any) -> Any:
    if isinstance(text, str):
        try:
            v = float(text)
        except ValueError:
            return text
        return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v
    return text


def _sweep_chart(sweep: dict[str, Any], label: str) -> str:
    """The first swept parameter on x (numeric, log10 when positive over a span of 20x or
    more; else categorical), the metric on y, one line per combination of the others."""
    x_key, rest = sweep["parameters"][0], sweep["parameters"][1:]
    jobs = [r for r in sweep["jobs"] if r["value"] is not None]
    values = [_as_number(r["params"].get(x_key)) for r in jobs]
    numeric = all(_number(v) for v in values)
    labels = None
    if not numeric:
        labels = []
        for r in sweep["jobs"]:
            v = str(r["params"].get(x_key))
            if v not in labels:
                labels.append(v)
    groups: dict[str, list[tuple[float, float]]] = {}
    for r, v in zip(jobs, values):
        name = ", ".join(f"{k}={r['params'].get(k)}" for k in rest) or label
        x = float(v) if numeric else float(labels.index(str(v)))  # type: ignore[union-attr]
        groups.setdefault(name, []).append((x, float(r["value"])))
    log_x = numeric and min(values) > 0 and max(values) / min(values) >= 20
    return svg_chart(f"{label} by {x_key}", [(n, sorted(pts)) for n, pts in groups.items()],
                     x_label=x_key, y_label=label, x_labels=labels, log_x=log_x)


def render(data: dict[str, Any]) -> str:
    """The whole page: a run's sections, or a sweep's comparison and each job's sections."""
    if "sweep" in data:
        jobs = "".join(
            f'<details{" open" if i == 1 else ""}><summary>job {i}: '
            f"{_e(' '.join(j.get('overrides', [])) or '(no overrides)')}"
            f"{' (' + _e(j['error']) + ')' if j.get('error') else ''}</summary>"
            f"{render_run(j, f'job{i}-')}</details>"
            for i, j in enumerate(data["jobs"], 1))
        body = _sweep_section(data) + _section("jobs", "Jobs", jobs)
        what = f"sweep of {len(data['jobs'])} jobs"
    else:
        body = render_run(data)
        what = " ".join(data.get("overrides") or []) or "no overrides"
    head = (f"<h1>{_e(data['recipe'])}</h1><div class=\"meta\">{_e(what)} · store "
            f"{_e(data['store'])}" + (f" · run {_e(data['invocation'])}"
                                      if data.get("invocation") else "")
            + f" · {_e(data['generated_at'])}</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(data['recipe'])}: run report</title><style>{CSS}</style></head>"
            f"<body>{head}{body}<script>{JS}</script></body></html>\n")
