"""composer_train over several shards streams: proportions, the checks that streams can be
mixed, the plan, and the data fingerprint of a mixture. Real Composer and Streaming on tiny
shards (the helpers of test_resume.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from recipe_engine import Artifact, RecipeError, StageError
from recipe_engine.testing import run_stage

from test_resume import N_TRAIN, make_shards, stage, traced


def with_tokenizer(art: Artifact, fingerprint: str) -> Artifact:
    return Artifact(kind="shards", path=art.path,
                    manifest={**art.manifest, "inputs": {"tokenizer": {"fingerprint": fingerprint}}})


@pytest.fixture(scope="module")
def two_streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    return (with_tokenizer(make_shards(root / "a", seed=1), "tok"),
            with_tokenizer(make_shards(root / "b", seed=2), "tok"))


def stream_of(trace: Path) -> Counter:
    """Samples drawn per stream: trace indices run through stream a's split, then b's."""
    drawn: Counter = Counter()
    for line in trace.read_text().splitlines():
        for i in json.loads(line)["samples"]:
            assert i >= 0
            drawn["a" if i < N_TRAIN else "b"] += 1
    return drawn


def test_proportions_decide_what_each_stream_contributes(tmp_path, two_streams):
    """An epoch of 512 samples at 0.75 / 0.25: 384 from a (a's 256 repeated 1.5 times) and
    128 from b (half of b); 32 batches of 16 make exactly one epoch."""
    with traced(tmp_path / "trace.jsonl") as trace:
        art = run_stage(stage(proportions=[3, 1], max_duration="32ba", save_interval="100ba"),
                        tmp_path / "run", inputs={"shards": list(two_streams)})
    assert stream_of(trace) == {"a": 384, "b": 128}
    streams = art.manifest["meta"]["streams"]
    assert [s["share"] for s in streams] == [0.75, 0.25]
    assert [s["epochs"] for s in streams] == [1.5, 0.5]
    assert (art.path / "model.safetensors").is_file()


def test_without_proportions_each_sample_once_per_epoch(tmp_path, two_streams):
    with traced(tmp_path / "trace.jsonl") as trace:
        run_stage(stage(max_duration="32ba", save_interval="100ba"), tmp_path / "run",
                  inputs={"shards": list(two_streams)})
    assert stream_of(trace) == {"a": 256, "b": 256}


def test_streams_of_other_tokenizers_or_lengths_are_refused(tmp_path, two_streams):
    a, b = two_streams
    with pytest.raises(StageError, match="another tokenizer"):
        run_stage(stage(), tmp_path / "r1", inputs={"shards": [a, with_tokenizer(b, "other")]})
    short = Artifact(kind="shards", path=b.path,
                     manifest={**b.manifest, "meta": {**b.meta, "seq_len": 16}})
    with pytest.raises(StageError, match="seq_len"):
        run_stage(stage(), tmp_path / "r2", inputs={"shards": [a, short]})
    with pytest.raises(StageError, match="proportions has 3 values for 2"):
        run_stage(stage(proportions=[1, 1, 1]), tmp_path / "r3", inputs={"shards": [a, b]})


def test_bad_proportions_fail_validation():
    with pytest.raises(RecipeError, match="proportions"):
        stage(proportions=[0.5, 0])
    with pytest.raises(RecipeError, match="proportions"):
        stage(proportions=[-1.0])


def test_plan_shows_share_and_epochs_per_stream(two_streams):
    plan = stage(proportions=[0.9, 0.1], max_duration="160ba").describe_plan(
        {"shards": [two_streams[0].meta, {**two_streams[1].meta, "num_train_samples": 16}]})
    a, b = plan["streams"]
    assert (a["share"], b["share"]) == (0.9, 0.1)
    assert a["samples_drawn"] == 2304 and a["epochs"] == 9.0 and "warning" in a
    assert b["samples_drawn"] == 256 and b["epochs"] == 16.0
    assert plan["steps"] == 160


def test_a_mixture_has_its_own_data_fingerprint(two_streams):
    from recipe_engine_plugins.training.data import mixed_data_fingerprint

    a, b = two_streams
    one = mixed_data_fingerprint([a], None)
    assert mixed_data_fingerprint([a, b], [0.5, 0.5]) not in (one, mixed_data_fingerprint([a, b], [0.9, 0.1]))
    assert mixed_data_fingerprint([a, b], [0.5, 0.5]) != mixed_data_fingerprint([b, a], [0.5, 0.5])


def test_a_plugin_outside_plugins_reads_mixed_shards(tmp_path, two_streams):
    """The toy plugin (tests/toy_plugin.py, not a built-in) takes the mixture's streams in a
    list slot and reads them through recipe_engine.artifacts only."""
    import toy_plugin

    art = run_stage(toy_plugin.ToyTokenCount(), tmp_path / "count",
                    inputs={"shards": list(two_streams)})
    m = art.manifest["metrics"]
    assert m["stream0/sequences"] == m["stream1/sequences"] == N_TRAIN
    assert m["stream0/tokens"] == N_TRAIN * 32 and m["stream1/train_samples"] == N_TRAIN
