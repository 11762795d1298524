"""The plugin's own tests. They pass whether or not the plugin is pip-installed:
``make_plugin_manager`` registers it, and registering an installed plugin again is a no-op."""
import json
from pathlib import Path

import pytest

import recipe_plugin_tokstats
from recipe_engine import DocumentFilter, RecipeError
from recipe_engine.testing import fake_entry_point, make_plugin_manager, run_stage


def test_no_todo_keeps_and_drops():
    pm = make_plugin_manager(recipe_plugin_tokstats)
    todo = pm.registry.build(DocumentFilter, {"name": "no_todo", "max_todos": 1})
    assert todo.reason({"text": "# TODO: one is fine\n"}) is None
    assert todo.reason({"text": "# TODO\n# FIXME\n"}) == "too_many_todos"
    with pytest.raises(RecipeError, match="max_todos"):
        pm.registry.build(DocumentFilter, {"name": "no_todo", "max_todos": -1})


def test_the_hook_logs_finished_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKSTATS_LOG", str(tmp_path / "log.jsonl"))
    pm = make_plugin_manager(recipe_plugin_tokstats)
    pm.hook.recipe_stage_finished(stage="shards", result={"status": "ran", "metrics": {"n": 1}})
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line == {"stage": "shards", "status": "ran", "metrics": {"n": 1}}


def test_listed_with_its_config_group(monkeypatch):
    # as if pip-installed (when it is, the real entry point is used and this one ignored)
    fake_entry_point(monkeypatch, "tokstats", "recipe_plugin_tokstats", "recipe-plugin-tokstats")
    packages = make_plugin_manager(entry_points=True).describe()["packages"]
    ours = next(p for p in packages if p["name"] == "recipe-plugin-tokstats")
    assert ours["config_groups"] == {"tokstats": ["default"]}
    assert ours["hooks"] == ["recipe_stage_finished"]


def test_token_stats_on_a_tiny_corpus(tmp_path):
    pm = make_plugin_manager(recipe_plugin_tokstats, entry_points=True)  # with the built-ins

    def stage(name, **params):
        return pm.registry.build("stage", {"name": name, **params})

    stdlib_json = str(Path(json.__file__).parent)
    docs = run_stage(stage("files_source", root=stdlib_json, include=["*.py"]), tmp_path / "docs",
                     pm=pm)
    tok = run_stage(stage("sentencepiece_bpe", vocab_size=400), tmp_path / "tok",
                    {"documents": docs}, pm=pm)
    shards = run_stage(stage("mds_shards", seq_len=32, val_fraction=0.2), tmp_path / "shards",
                       {"documents": docs, "tokenizer": tok}, pm=pm)
    stats = run_stage(stage("token_stats", top_k=5), tmp_path / "stats",
                      {"tokenizer": tok, "shards": shards}, pm=pm)

    report = json.loads((stats.path / "report.json").read_text())
    metrics = stats.manifest["metrics"]
    assert report["splits"]["train"]["tokens"] == shards.meta["num_train_tokens"] > 0
    assert len(report["top_tokens"]) == 5 and 0 < metrics["top_token_fraction"] < 1
    assert 0 < metrics["distinct_tokens"] <= 400
