"""The run report: `recipe report` and the HTML file every `recipe run` writes, on the toy
recipe (a single run, a failed run and a multirun), with a fake training curve
(``metrics.jsonl``) and generation samples (``samples.json``) planted in committed artifacts.
The slow test opens a report in headless Chromium through the DevTools protocol."""
from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, statuses
from recipe_engine import report

SCRIPT = "<script>alert(1)</script>"


def _reports(store: Path) -> list[Path]:
    return sorted(p for p in (store / "reports" / "toy").glob("*.html") if p.name != "latest.html")


def _artifact(summary: dict, stage: str) -> Path:
    return Path(next(s["artifact"] for s in summary["stages"] if s["name"] == stage))


def _plant_curve(directory: Path, steps: int, extra_key: str = "") -> None:
    """A training log: loss, lr, tokens/s every step, val_loss every 10th; one malformed line;
    one step logged twice (a resumed run), the later record wins."""
    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "tokens": step * 512, "loss": 6 * math.exp(-step / 10) + 2,
               "lr": 1e-3 * min(1.0, step / 5), "tokens_per_second": 1000.0 + step}
        if step % 10 == 0:
            rec["val_loss"] = rec["loss"] + 0.1
        if extra_key:
            rec[extra_key] = 0.5
        lines.append(json.dumps(rec))
    lines.insert(3, "not json")
    lines.append(json.dumps({"step": steps, "loss": 1.25}))
    (directory / report.METRICS_FILE).write_text("\n".join(lines) + "\n")


def _polyline(page: str, series: str) -> list[str]:
    """The points of every polyline of ``series`` in the page."""
    return [m.group(2).split() for m in re.finditer(
        r'<polyline class="series" data-series="([^"]*)" data-points="\d+" points="([^"]*)"',
        page) if m.group(1) == series]


def test_a_run_writes_its_report(toy):
    rc, out, err = toy("run", toy.recipe, "--json")
    assert rc == 0, err
    summary = json.loads(out)  # stdout stays one JSON object
    written = _reports(toy.store)
    assert len(written) == 1 and f"report: {written[0]}" in err
    page = written[0].read_text()
    assert (toy.store / "reports" / "toy" / "latest.html").read_text() == page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    stages = re.search(r'<section id="graph">.*?</section>', page, re.S).group()
    for name in ("numbers", "upper", "report"):
        assert f'<g class="node" data-stage="{name}" data-status="ran">' in stages
        assert f"<td>{name}</td>" in stages
    assert stages.count('<path class="edge"') == 2  # numbers -> upper, numbers -> report
    assert "score=2.5" in stages and "documents=5" in stages
    funnel = re.search(r'<section id="funnel">.*?</section>', page, re.S).group()
    assert [re.sub("<.*?>", "", c) for c in re.findall(r"<tr><td>upper</td>.*?</tr>", funnel)[0]
            .split("</td>")[:4]] == ["upper", "done", "5", "5"]
    evals = re.search(r'<section id="evals">.*?</section>', page, re.S).group()
    assert "<td>score</td>" in evals and ">2.5<" in evals
    assert "No curves" in page and "No samples" in page
    assert summary["invocation"][:8] in written[0].name


def test_report_command_curves_samples_and_json(toy, tmp_path):
    summary = toy.run_json()
    _plant_curve(_artifact(summary, "upper"), steps=37)
    (_artifact(summary, "report") / report.SAMPLES_FILE).write_text(json.dumps(
        {"settings": {"temperature": 0.7},
         "samples": [{"prompt": "def add(a, b):\n", "completion": "    return a + b\n",
                      "seed": 1}, {"prompt": 3}]}))
    out_file = tmp_path / "r.html"
    rc, out, err = toy("report", toy.recipe, "--out", out_file)
    assert rc == 0, err
    assert out.strip() == str(out_file)
    page = out_file.read_text()
    loss = _polyline(page, "loss")
    assert len(loss) == 1 and len(loss[0]) == 37  # one point per step, the repeat merged
    assert len(_polyline(page, "val_loss")[0]) == 3
    assert len(_polyline(page, "lr")[0]) == len(_polyline(page, "tokens_per_second")[0]) == 37
    assert not _polyline(page, "tokens")  # an x quantity, not a curve
    # the last point of the loss curve is the repeated step's later value, 1.25: the lowest
    ys = [float(p.split(",")[1]) for p in loss[0]]
    assert ys[-1] == max(ys)  # SVG y grows downwards
    assert "1 line(s) without a JSON object" in page  # the malformed line, counted
    samples = re.search(r'<section id="samples">.*?</section>', page, re.S).group()
    assert "return a + b" in samples and "temperature=0.7" in samples and "seed=1" in samples
    assert "1 sample(s) that are not objects" in page
    # statuses without a run summary: what the store holds
    assert '<g class="node" data-stage="upper" data-status="done">' in page

    rc, out, err = toy("report", toy.recipe, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert [s["status"] for s in data["stages"]] == ["done"] * 3
    (curve,) = data["curves"]
    assert curve["stage"] == "upper" and curve["records"] == 38 and curve["skipped"] == 1
    assert curve["num_points"]["loss"] == 37 and curve["series"]["loss"][-1] == [37, 1.25]
    assert data["evals"][0]["rows"][0]["name"] == "score"
    assert list(data["stages"][0]) >= ["name", "component", "kind", "inputs", "fingerprint"]
    # without --out, --json writes no HTML
    assert not list((toy.store / "reports").glob("toy/*-report.html"))

    rc, out, err = toy("report", toy.recipe, "data.count=2")  # another configuration
    assert rc == 0, err
    page = Path(out.strip()).read_text()
    assert Path(out.strip()).parent == toy.store / "reports" / "toy"
    assert '<g class="node" data-stage="numbers" data-status="earlier">' in page


def test_everything_from_recipes_and_artifacts_is_escaped(toy):
    prefix = '<script>x</script>"'
    summary = toy.run_json(f"+stages.numbers.params.prefix='{prefix}'", "data.count=2")
    _plant_curve(_artifact(summary, "upper"), steps=5, extra_key=SCRIPT)
    (_artifact(summary, "report") / report.SAMPLES_FILE).write_text(json.dumps(
        [{"prompt": SCRIPT, "completion": "</pre><script>bad()</script>", SCRIPT: SCRIPT}]))
    rc, out, err = toy("report", toy.recipe, f"+stages.numbers.params.prefix='{prefix}'",
                       "data.count=2")
    assert rc == 0, err
    page = Path(out.strip()).read_text()
    assert page.lower().count("<script") == 1  # the report's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the metric, the samples
    assert "&lt;script&gt;x&lt;/script&gt;&quot;" in page  # the parameter
    assert "&lt;/pre&gt;&lt;script&gt;bad()" in page


def test_a_failed_run_reports_the_failure(toy):
    rc, out, err = toy("run", toy.recipe, "-q", "+stages.upper.params.fail=true")
    assert rc == 1
    (path,) = _reports(toy.store)
    page = path.read_text()
    assert '<g class="node" data-stage="upper" data-status="failed">' in page
    assert "toy failure requested" in page
    assert '<g class="node" data-stage="numbers" data-status="ran">' in page


def test_a_report_that_fails_never_fails_the_run(toy, monkeypatch):
    def broken(data):
        raise RuntimeError("no report today")

    monkeypatch.setattr(report, "render", broken)
    rc, out, err = toy("run", toy.recipe, "--json")
    assert rc == 0
    assert statuses(json.loads(out)) == {"numbers": "ran", "upper": "ran", "report": "ran"}
    assert "warning: the run report was not written: RuntimeError: no report today" in err
    assert not _reports(toy.store)


def test_multirun_report_compares_the_jobs(toy):
    rc, out, err = toy("run", toy.recipe, "-q", "-m", "opt.lr=0.1,0.3")
    assert rc == 0, err
    (path,) = _reports(toy.store)
    page = path.read_text()
    sweep = re.search(r'<section id="sweep">.*?</section>', page, re.S).group()
    rows = [re.sub(r"<.*?>", " ", r).split() for r in re.findall(r"<tr><td.*?</tr>", sweep)]
    assert rows == [["1", "0.1", "done", "2.5"], ["2", "0.3", "done", "7.5"]]
    assert "<th>opt.lr</th>" in sweep and "<th>report/score</th>" in sweep
    assert len(_polyline(sweep, "report/score")[0]) == 2
    for i in (1, 2):  # each job's own sections
        assert f'<section id="job{i}-graph">' in page and f'<section id="job{i}-evals">' in page

    # from the store: a third value never ran; its row says so and has no metric
    rc, out, err = toy("report", toy.recipe, "-m", "opt.lr=0.1,0.3,0.5", "--json")
    assert rc == 0, err
    sweep = json.loads(out)["sweep"]
    assert sweep["parameters"] == ["opt.lr"] and (sweep["stage"], sweep["metric"]) == (
        "report", "score")
    assert [(j["params"], j["status"], j["value"]) for j in sweep["jobs"]] == [
        ({"opt.lr": "0.1"}, "done", 2.5), ({"opt.lr": "0.3"}, "done", 7.5),
        ({"opt.lr": "0.5"}, "incomplete", None)]
    # another metric, and one that does not exist
    rc, out, err = toy("report", toy.recipe, "-m", "opt.lr=0.1,0.3", "--json",
                       "--metric", "upper/documents")
    assert rc == 0, err
    assert [j["value"] for j in json.loads(out)["sweep"]["jobs"]] == [5, 5]
    rc, out, err = toy("report", toy.recipe, "-m", "opt.lr=0.1,0.3", "--metric", "scroe")
    assert rc == 1 and "no metric 'scroe'" in err and 'did you mean "score"' in err


def test_multirun_over_a_config_group_plots_categories():
    jobs = [{"overrides": [f"opt={o}", f"data.count={n}"], "stages": [
        {"name": "report", "status": "ran", "metrics": {"score": v}}],
        "evals": [{"stage": "report", "metrics": {"score": v}}]}
        for o, n, v in [("slow", 3, 1.0), ("fast", 3, 2.0), ("slow", 5, 3.0)]]
    sweep = report.compare(jobs)
    assert sweep["parameters"] == ["opt", "data.count"]
    chart = report._sweep_chart(sweep, "report/score")
    assert [len(p) for p in (_polyline(chart, "data.count=3"), _polyline(chart, "data.count=5"))
            ] == [1, 1]
    assert len(_polyline(chart, "data.count=3")[0]) == 2
    assert ">slow</text>" in chart and ">fast</text>" in chart


def test_long_curves_are_thinned_keeping_the_last_point(tmp_path):
    (tmp_path / report.METRICS_FILE).write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5002)))
    problems: list[str] = []
    curve = report.read_curves(tmp_path / report.METRICS_FILE, problems)
    assert not problems and curve["num_points"]["loss"] == 5001
    points = curve["series"]["loss"]
    assert len(points) <= report.MAX_POINTS + 1 and points[0][0] == 1 and points[-1][0] == 5001


def test_eval_rows_pair_stderr_and_split_tasks():
    rows = report.eval_rows({"python_basics/acc": 0.5, "python_basics/acc_stderr": 0.1,
                             "bits_per_byte": 1.2, "code_exec/pass@1": 0.25,
                             "code_exec/pass@1_stderr": 0.05, "bad": float("nan")},
                            {"n-shot": {"python_basics": 0}})
    assert [(r["task"], r["metric"], r["value"], r["stderr"], r["n_shot"]) for r in rows] == [
        ("python_basics", "acc", 0.5, 0.1, 0), ("", "bits_per_byte", 1.2, None, None),
        ("code_exec", "pass@1", 0.25, 0.05, None)]


def test_the_documented_file_formats_are_read(tmp_path):
    doc = (ROOT / "docs" / "report.md").read_text()
    jsonl = re.search(r"```jsonl\n(.*?)```", doc, re.S).group(1)
    samples = re.search(r"```json\n(.*?)```", doc, re.S).group(1)
    (tmp_path / report.METRICS_FILE).write_text(jsonl)
    (tmp_path / report.SAMPLES_FILE).write_text(samples)
    problems: list[str] = []
    curve = report.read_curves(tmp_path / report.METRICS_FILE, problems)
    got = report.read_samples(tmp_path / report.SAMPLES_FILE, problems)
    assert problems == []
    assert set(curve["series"]) == {"loss", "lr", "tokens_per_second", "val_loss",
                                    "eval/python_basics/acc"}
    assert curve["series"]["loss"] == [[10, 6.91], [20, 5.72]]
    assert got["samples"][0]["prompt"] == "def fibonacci(n):\n" and got["settings"]["seed"] == 0


def test_report_imports_no_ml_framework(tmp_path):
    code = ("import sys; from recipe_engine.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'composer', 'streaming', 'lm_eval', "
            "'transformers', 'sentencepiece', 'numpy') if m in sys.modules)\n"
            "print('RC', rc, 'HEAVY', heavy, file=sys.stderr)\n")
    out = tmp_path / "micro.html"
    proc = subprocess.run([sys.executable, "-c", code, "report", "recipes/micro_code.yaml",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RECIPE_STORE": str(tmp_path / "store")})
    assert "RC 0 HEAVY []" in proc.stderr, proc.stderr[-2000:]
    page = out.read_text()
    assert 'data-status="not run"' in page and 'data-stage="train"' in page


# -- headless Chromium -----------------------------------------------------------------------


class DevTools:
    """Chromium driven through the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-terminated JSON messages on fds 3 and 4), standard library only."""

    def __init__(self, chromium: str, profile: Path):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        # the browser reads commands on fd 3 and answers on fd 4
        launch = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                  "os.execv(sys.argv[3], sys.argv[3:])")
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", launch, str(to_child_r), str(from_child_w), chromium,
                 "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(to_child_r, from_child_w), stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"]
                    if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def load(self, url: str, timeout: float = 60) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read(deadline))
        self.call("Runtime.evaluate", session=True, expression="1")  # flush pending events

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


RENDERED = """JSON.stringify({
  svgs: document.querySelectorAll('svg').length,
  drawn: Array.from(document.querySelectorAll('polyline.series')).filter(function (p) {
    var b = p.getBBox(); return p.points.length > 0 && (b.width > 0 || b.height > 0); }).length,
  polylines: document.querySelectorAll('polyline.series').length,
  nodes: document.querySelectorAll('svg.graph g.node').length,
  sorted: (function () {
    var t = document.querySelector('table.sweep'); if (!t) return null;
    t.tHead.rows[0].cells[3].click(); t.tHead.rows[0].cells[3].click();
    return Array.from(t.tBodies[0].rows).map(function (r) { return r.cells[0].textContent; });
  })()
})"""


@pytest.mark.slow
def test_reports_render_in_headless_chromium(toy, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        why = "headless Chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("RECIPE_TEST_REQUIRE_CHROMIUM"):  # CI: a skip would hide the check
            pytest.fail(why)
        pytest.skip(why)
    rc, out, err = toy("run", toy.recipe, "-q", "-m", "opt.lr=0.1,0.3")
    assert rc == 0, err
    (sweep_page,) = _reports(toy.store)
    summary = toy.run_json()
    _plant_curve(_artifact(summary, "upper"), steps=30, extra_key=SCRIPT)
    run_page = tmp_path / "run.html"
    assert toy("report", toy.recipe, "--out", run_page)[0] == 0
    bad_page = tmp_path / "bad.html"  # the check itself: a page with errors is caught
    bad_page.write_text("<!DOCTYPE html><html><body><script>console.error('boom');"
                        "undefinedFunction();</script></body></html>")

    browser = DevTools(chromium, tmp_path / "profile")
    try:
        browser.load(bad_page.as_uri())
        assert len(browser.errors()) == 2, browser.events

        browser.load(run_page.as_uri())
        state = json.loads(browser.evaluate(RENDERED))
        assert browser.errors() == []
        # graph + loss, lr, tokens/s and the planted key's chart
        assert state["svgs"] == 5 and state["nodes"] == 3
        assert state["polylines"] == 5 and state["drawn"] == 5  # loss, val_loss, lr, tok/s, key

        browser.load(sweep_page.as_uri())
        state = json.loads(browser.evaluate(RENDERED))
        assert browser.errors() == []
        assert state["drawn"] == state["polylines"] == 1  # the sweep's chart
        assert state["nodes"] == 6  # each job's graph
        assert state["sorted"] == ["2", "1"]  # clicked twice on the metric: descending
    finally:
        browser.close()


def test_in_loop_eval_curves_share_one_chart_per_task():
    from recipe_engine.report import _curve_groups

    series = {k: [] for k in ("loss", "lr", "eval/python_basics/acc", "eval/python_basics/acc_norm",
                              "eval/python_basics/acc_stderr", "eval/python_basics/num_samples",
                              "grad_norm")}
    groups = {title: keys for title, _, keys in _curve_groups(series)}
    assert groups["in-loop eval: python_basics"] == ["eval/python_basics/acc",
                                                     "eval/python_basics/acc_norm"]
    assert "eval/python_basics/acc_stderr" not in {k for ks in groups.values() for k in ks}
    assert groups["grad_norm"] == ["grad_norm"] and groups["loss"] == ["loss"]
