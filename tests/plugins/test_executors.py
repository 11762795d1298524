"""Executors: `local` keeps one process pool per instance and releases it; `ray` is imported
only when it runs; and a chain of real data stages writes byte-identical artifacts under
`serial`, `local` with two workers and a local Ray instance."""
from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data import ExactDedup, FilterStage
from recipe_engine_plugins.data.langid import LanguageId
from recipe_engine_plugins.executors import LocalExecutor, RayExecutor, SerialExecutor


def pid_of(item: int) -> tuple[int, int]:
    return item, os.getpid()


def die(item: int) -> None:
    os._exit(1)


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError("three")
    return item


def test_local_reuses_one_pool_until_the_executor_goes():
    ex = LocalExecutor(num_workers=2)
    first = list(ex.map(pid_of, range(6)))
    pool = ex._pool
    second = list(ex.map(pid_of, range(6)))
    assert [i for i, _ in first] == [i for i, _ in second] == list(range(6))
    assert ex._pool is pool, "the second map started another pool"
    pids = {p for _, p in first + second}
    assert os.getpid() not in pids and len(pids) <= 2
    processes = list(pool._processes.values())
    del ex, pool
    gc.collect()
    assert all(not p.is_alive() for p in processes)


def test_local_pool_survives_errors_and_is_replaced_when_broken():
    with LocalExecutor(num_workers=2) as ex:
        with pytest.raises(ValueError, match="three"):
            list(ex.map(fail_on_three, range(6)))
        pool = ex._pool
        assert [i for i, _ in ex.map(pid_of, [0, 1, 2])] == [0, 1, 2]
        assert ex._pool is pool  # a task's error leaves the pool usable
        with pytest.raises(BrokenProcessPool):
            list(ex.map(die, [0, 1]))
        assert ex._pool is None  # a dead worker broke it: shut down
        assert list(ex.map(pid_of, [0, 1]))[1][0] == 1  # and the next map starts a new one
        processes = list(ex._pool._processes.values())
    assert ex._pool is None and all(not p.is_alive() for p in processes)  # closed on exit


def test_single_task_runs_in_process():
    ex = LocalExecutor(num_workers=4)
    assert list(ex.map(pid_of, [7])) == [(7, os.getpid())]
    assert ex._pool is None


def test_executor_parameters_are_checked():
    with pytest.raises(RecipeError, match="num_workers"):
        LocalExecutor(num_workers=-1)
    with pytest.raises(RecipeError, match="num_cpus"):
        RayExecutor(address="auto", num_cpus=4)
    with pytest.raises(RecipeError, match="max_in_flight"):
        RayExecutor(max_in_flight=-2)


def test_ray_is_not_imported_until_it_runs():
    code = ("import sys\n"
            "from recipe_engine.plugins import PluginManager\n"
            "pm = PluginManager()\n"
            "ex = pm.registry.build('executor', {'name': 'ray', 'num_cpus': 2})\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the same bytes whatever the executor ----------------------------------------------------

SENTENCES = {
    "en": ["The river flooded the lower town after three days of rain.",
           "Our neighbours planted apple trees along the garden wall last spring.",
           "The museum opens an exhibition of early photographs next month."],
    "fr": ["La rivière a inondé la ville basse après trois jours de pluie.",
           "Nos voisins ont planté des pommiers le long du mur du jardin."],
    "de": ["Der Fluss überschwemmte nach drei Tagen Regen die Unterstadt.",
           "Unsere Nachbarn pflanzten im letzten Frühling Apfelbäume an der Gartenmauer."],
}
CODE = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"


def corpus(path: Path, num_parts: int = 5, per_part: int = 12) -> Artifact:
    rng = random.Random(0)
    path.mkdir(parents=True)
    for p in range(num_parts):
        docs = []
        for j in range(per_part):
            kind = rng.choice(["en", "en", "fr", "de", "code", "short", "dup"])
            if kind == "code":
                text = CODE
            elif kind == "short":
                text = "ok"
            elif kind == "dup":
                text = " ".join(SENTENCES["en"])
            else:
                text = " ".join(rng.sample(SENTENCES[kind], len(SENTENCES[kind])))
            docs.append({"id": f"p{p}-{j}", "text": text, "source": "gen", "path": None})
        write_documents(path / f"part-{p:05d}.jsonl.zst", docs)
    return Artifact(kind="documents", path=path, manifest={})


def run_chain(root: Path, inp: Artifact, executor) -> dict[str, dict[str, bytes]]:
    """filter -> language_id -> exact_dedup under ``executor``: every output file's bytes,
    and the manifests' counts and meta."""
    stages = [
        ("filter", FilterStage(filters=[{"name": "length", "min_chars": 10},
                                        {"name": "length", "max_chars": 250}], keep_dropped=True)),
        ("language_id", LanguageId(languages=["en", "fr"], keep_dropped=True)),
        ("exact_dedup", ExactDedup()),
    ]
    out: dict[str, dict[str, bytes]] = {}
    for name, stage in stages:
        inp = run_stage(stage, root / name, inputs={"documents": inp}, executor=executor)
        files = {str(f.relative_to(inp.path)): f.read_bytes()
                 for f in sorted(inp.path.rglob("*")) if f.is_file() and f.name != "manifest.json"}
        files["counts+meta"] = json.dumps([inp.manifest["counts"], inp.manifest["meta"]],
                                          sort_keys=True).encode()
        out[name] = files
    return out


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    inp = corpus(root / "in")
    result = run_chain(root, inp, SerialExecutor())
    assert result["language_id"]["counts+meta"] and len(result["filter"]) > 2
    counts = json.loads(result["language_id"]["counts+meta"])[0]
    assert counts["documents_out"] > 20 and counts["dropped.language.de"] > 0
    assert counts["dropped.low_language_score"] > 0  # the code
    assert json.loads(result["exact_dedup"]["counts+meta"])[0]["duplicates_removed"] > 0
    return inp, result


def test_local_pool_writes_the_same_bytes_as_serial(serial_run, tmp_path):
    inp, expected = serial_run
    with LocalExecutor(num_workers=2) as ex:
        assert run_chain(tmp_path, inp, ex) == expected


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    yield RayExecutor(num_cpus=2)
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow  # starting a local Ray instance takes 5 to 20 s
def test_ray_writes_the_same_bytes_as_serial(serial_run, ray_instance, tmp_path):
    inp, expected = serial_run
    assert run_chain(tmp_path, inp, ray_instance) == expected
    # a task's error comes back as itself, not wrapped
    with pytest.raises(ValueError, match="three"):
        list(RayExecutor(max_in_flight=2).map(fail_on_three, range(6)))
    assert list(RayExecutor(max_in_flight=1).map(pid_of, range(5)))[4][0] == 4
