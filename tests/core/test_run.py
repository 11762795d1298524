"""Runner, store and CLI behaviour on the toy plugin (no ML libraries involved)."""
import json
import os

from conftest import statuses


def test_run_then_everything_cached(toy):
    first = toy.run_json()
    assert statuses(first) == {"numbers": "ran", "upper": "ran", "report": "ran"}
    assert first["recipe"] == "toy"
    for st in first["stages"]:
        assert set(st) >= {"name", "component", "fingerprint", "status", "seconds", "artifact", "metrics"}
        manifest = json.loads(open(os.path.join(st["artifact"], "manifest.json")).read())
        assert manifest["fingerprint"] == st["fingerprint"]
        assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert first["stages"][2]["metrics"]["score"] == 0.1 * len("doc 0") * 5
    # a marker planted in each committed artifact survives: the second run reuses, not redoes
    for st in first["stages"]:
        with open(os.path.join(st["artifact"], "planted.txt"), "w") as f:
            f.write(st["name"])
    second = toy.run_json()
    assert set(statuses(second).values()) == {"cached"}
    for st in second["stages"]:
        assert open(os.path.join(st["artifact"], "planted.txt")).read() == st["name"]
    assert [s["fingerprint"] for s in second["stages"]] == [s["fingerprint"] for s in first["stages"]]


def test_json_stdout_is_exactly_one_object(toy):
    rc, out, err = toy("run", toy.recipe, "--json")
    assert rc == 0
    json.loads(out)  # nothing else on stdout
    assert "numbers" in err  # progress went to stderr


def test_changing_one_parameter_reruns_that_stage_and_descendants_only(toy):
    toy.run_json()
    changed = toy.run_json("stages.upper.params.suffix=zz")
    assert statuses(changed) == {"numbers": "cached", "upper": "ran", "report": "cached"}
    upstream = toy.run_json("data.count=3")
    assert statuses(upstream) == {"numbers": "ran", "upper": "ran", "report": "ran"}


def test_default_values_do_not_change_the_fingerprint(toy):
    a = toy.run_json()
    b = toy.run_json("++stages.upper.params.mode=upper")  # the default, written out
    assert statuses(b)["upper"] == "cached"
    assert a["stages"][1]["fingerprint"] == b["stages"][1]["fingerprint"]


def test_multirun_shares_upstream_stages(toy):
    rc, out, err = toy("run", toy.recipe, "-m", "opt.lr=0.1,0.3", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert [j["overrides"] for j in result["jobs"]] == [["opt.lr=0.1"], ["opt.lr=0.3"]]
    first, second = (statuses(j) for j in result["jobs"])
    assert first == {"numbers": "ran", "upper": "ran", "report": "ran"}
    assert second == {"numbers": "cached", "upper": "cached", "report": "ran"}
    scores = [j["stages"][2]["metrics"]["score"] for j in result["jobs"]]
    assert scores[1] == 3 * scores[0]


def test_multirun_over_a_config_group(toy):
    result = toy.run_json("-m", "opt=slow,fast")
    assert len(result["jobs"]) == 2
    assert statuses(result["jobs"][1])["numbers"] == "cached"


def test_force_and_until(toy):
    toy.run_json()
    forced = toy.run_json("--force", "upper")
    assert statuses(forced) == {"numbers": "cached", "upper": "ran", "report": "cached"}
    forced_src = toy.run_json("--force", "numbers")
    assert set(statuses(forced_src).values()) == {"ran"}
    until = toy.run_json("--until", "upper", "data.count=2")
    assert statuses(until) == {"numbers": "ran", "upper": "ran"}


def test_failing_stage_commits_nothing(toy):
    rc, out, err = toy("run", toy.recipe, "++stages.upper.params.fail=true")
    assert rc == 1
    assert "stage 'upper' failed" in err and "toy failure requested" in err
    artifacts = list((toy.store / "artifacts").iterdir())
    assert len(artifacts) == 1  # numbers only; upper left nothing that looks complete
    assert not list(toy.store.glob("artifacts/*/partial.txt"))
    # the next run reuses numbers and runs upper from scratch
    ok = toy.run_json()
    assert statuses(ok)["numbers"] == "cached" and statuses(ok)["upper"] == "ran"


def test_failing_stage_json(toy):
    rc, out, err = toy("run", toy.recipe, "--json", "++stages.upper.params.fail=true")
    assert rc == 1
    summary = json.loads(out)
    assert statuses(summary) == {"numbers": "ran", "upper": "failed"}
    assert "toy failure requested" in summary["error"]


def test_plan_marks_new_cached_stale(toy):
    rc, out, _ = toy("plan", toy.recipe, "--json")
    assert rc == 0
    assert {s["name"]: s["status"] for s in json.loads(out)["stages"]} == {
        "numbers": "new", "upper": "new", "report": "new"}
    toy.run_json()
    rc, out, _ = toy("plan", toy.recipe, "--json", "stages.upper.params.suffix=yy")
    assert {s["name"]: s["status"] for s in json.loads(out)["stages"]} == {
        "numbers": "cached", "upper": "stale", "report": "cached"}
    rc, out, _ = toy("plan", toy.recipe)
    assert rc == 0 and "cached" in out


def test_store_env_var_and_flag(toy, tmp_path):
    other = tmp_path / "elsewhere"
    result = toy.run_json("--store", str(other))
    assert result["store"] == str(other)
    assert (other / "artifacts").is_dir()


def test_nested_subcomponent_params_are_fingerprinted(toy):
    a = toy.run_json("++stages.upper.params.marker={name: bang, times: 2}")
    b = toy.run_json("++stages.upper.params.marker={name: bang, times: 3}")
    assert statuses(b)["upper"] == "ran"
    assert a["stages"][1]["fingerprint"] != b["stages"][1]["fingerprint"]


def test_progress_counts_only_the_selected_stages(toy):
    rc, out, err = toy("run", toy.recipe, "--until", "upper")
    assert rc == 0
    assert "[2/2] upper" in err and "/3]" not in err


def test_a_new_plugin_package_version_reruns_its_stages(toy, monkeypatch):
    from recipe_engine.testing import fake_entry_point

    first = toy.run_json()
    fake_entry_point(monkeypatch, "toy", "toy_plugin", version="0.0.1")  # the package upgraded
    second = toy.run_json()
    assert set(statuses(second).values()) == {"ran"}
    assert [s["fingerprint"] for s in second["stages"]] != [s["fingerprint"] for s in first["stages"]]


def test_components_may_opt_out_of_package_versions():
    from dataclasses import dataclass

    from recipe_engine import Stage
    from recipe_engine.plugins import Registered

    @dataclass(kw_only=True)
    class Stable(Stage, name="stable", output="documents", tracks_package_version=False):
        """Output fixed by its own version alone."""

    assert Registered(Stable, "pkg", "1.0").fingerprint_version == \
        Registered(Stable, "pkg", "2.0").fingerprint_version == "1"
