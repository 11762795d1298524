"""A follower node's two waits on node 0 (``runner._Leader.wait_for_commit`` and
``wait_for_start``, one polling loop), driven by hand: node 0's record is written here, and
a committed artifact comes from a single-node run of the toy recipe."""
import threading
import time

import pytest

from recipe_engine import StageError, runner
from recipe_engine.progress import Progress


@pytest.fixture
def leader(tmp_path, monkeypatch):
    """A committed ``numbers`` artifact, and a follower's view of a node 0 whose record
    this test writes (``leader.say(stages)``)."""
    import toy_plugin
    from conftest import TESTS
    from recipe_engine import config
    from recipe_engine.store import Store
    from recipe_engine.testing import make_plugin_manager
    from recipe_engine.validate import validate

    monkeypatch.setattr(runner._Leader, "POLL", 0.01)
    pm = make_plugin_manager(toy_plugin, entry_points=True)
    loaded = config.load(str(TESTS / "recipes" / "toy.yaml"), [], pm.config_dirs())
    recipe = validate(loaded, pm.registry, pm.hook.recipe_default_executor())
    store = Store(tmp_path / "store")
    runner.run(recipe, pm, store, until="numbers", progress=Progress(1, enabled=False))
    fps = runner.compute_fingerprints(recipe, pm)
    nodes = runner.Nodes(count=2, rank=1, master="127.0.0.1:29999", timeout=0.5)
    lead = runner._Leader(store, recipe.name, nodes, fps)

    def say(stages, state="running"):
        store.write_node_record(lead.path, {"fingerprints": fps, "invocation": "now",
                                            "state": state, "stages": stages,
                                            "beat": time.monotonic()})

    lead.say, lead.fp = say, fps["numbers"]
    return lead


def in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn(*args)))
    t.start()
    return t, out


def test_an_artifact_committed_before_counts_unless_forced(leader):
    assert leader.wait_for_commit("numbers", leader.fp, False).manifest["stage"] == "numbers"
    assert leader.wait_for_start("numbers", leader.fp, False) is not None  # nothing to join


@pytest.mark.parametrize("wait", ["wait_for_commit", "wait_for_start"])
def test_a_forced_stage_waits_for_node0s_run_to_report_it(leader, wait):
    leader.say({"numbers": "pending"})
    t, out = in_thread(getattr(leader, wait), "numbers", leader.fp, True)
    time.sleep(0.15)
    assert t.is_alive()  # the old artifact does not count
    leader.say({"numbers": "ran"})
    t.join(5)
    assert not t.is_alive() and out["value"].manifest["stage"] == "numbers"


def test_start_returns_when_node0_starts_the_stage_commit_waits_on(leader):
    leader.say({"numbers": "pending"})
    commit, got = in_thread(leader.wait_for_commit, "numbers", leader.fp, True)
    start, joined = in_thread(leader.wait_for_start, "numbers", leader.fp, True)
    time.sleep(0.1)
    leader.say({"numbers": "running"})
    start.join(5)
    assert not start.is_alive() and joined == {"value": None}  # join it now
    time.sleep(0.1)
    assert commit.is_alive()  # running is not committed
    leader.say({"numbers": "cached"})
    commit.join(5)
    assert not commit.is_alive() and got["value"] is not None


@pytest.mark.parametrize("wait, doing", [("wait_for_commit", "commit"),
                                         ("wait_for_start", "start")])
def test_node0_failing_or_silent_ends_the_wait(leader, wait, doing):
    leader.say({}, state="failed")
    with pytest.raises(StageError, match=f"node 0 failed before a stage.*to {doing} stage "
                                         "'numbers'"):
        getattr(leader, wait)("numbers", leader.fp, True)
    leader.path.unlink()  # node 0 gone: silence, then the timeout (0.5 s here)
    with pytest.raises(StageError, match=f"no sign of node 0 .* to {doing} stage 'numbers'"):
        getattr(leader, wait)("numbers", "0" * 64, False)
