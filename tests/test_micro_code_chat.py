"""End to end: the real micro_code_chat recipe (micro_code, then SFT, DPO, pass@k of three
checkpoints, held-out scoring and export of the DPO model), shrunk by overrides to a few
stdlib files and modules, a tiny model and a few steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, statuses
from test_micro_code import TINY

RECIPE = str(ROOT / "recipes" / "micro_code_chat.yaml")
CHAT_TINY = [
    *TINY,
    "shards.seq_len=128",  # the context SFT and DPO rows get
    "++chat_data.instructions.modules=[textwrap,shlex,string,json,csv]",
    "++chat_data.preferences.modules=[json,shutil,http.cookiejar,zipfile]",
    "chat_data.holdout.fraction=0.2",
    "sft.global_batch_size=4", "sft.max_duration=4ba", "sft.save_interval=2ba",
    "dpo.global_batch_size=2", "dpo.max_duration=2ba", "dpo.save_interval=2ba",
    "eval.code_exec.max_problems=2", "eval.code_exec.n=1", "eval.code_exec.ks=[1]",
    "eval.code_exec.max_new_tokens=8",
]
CHAT = ["sft_source", "sft_pii", "sft_sync", "sft_schema", "sft_holdout", "sft",
        "dpo_source", "dpo_pii", "dpo_sync", "dpo_schema", "dpo_holdout", "dpo",
        "code_exec_base", "code_exec_sft", "code_exec_dpo", "evaluate_dpo", "export_dpo"]


def recipe(*args, store, timeout):
    env = {**os.environ, "RECIPE_STORE": str(store), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "recipe_engine.cli", "run", RECIPE, "--json", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_the_chat_recipe_runs_end_to_end(tmp_path):
    summary = recipe(*CHAT_TINY, store=tmp_path / "store", timeout=1500)
    names = [s["name"] for s in summary["stages"]]
    assert names[-len(CHAT):] == CHAT and set(statuses(summary).values()) == {"ran"}
    manifests = {s["name"]: json.loads((Path(s["artifact"]) / "manifest.json").read_text())
                 for s in summary["stages"]}
    sft, dpo = manifests["sft"], manifests["dpo"]
    assert sft["meta"]["steps"] == 4 and sft["meta"]["chat_format"] == "chatml"
    assert sft["metrics"]["val_loss"] > 0 and sft["metrics"]["val_loss_before"] > 0
    for key in ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected"):
        assert f"train/{key}" in dpo["metrics"]
    assert 0 <= dpo["metrics"]["train/reward_accuracy"] <= 1
    for stage in ("code_exec_base", "code_exec_sft", "code_exec_dpo"):
        metrics = manifests[stage]["metrics"]
        assert 0 <= metrics["code_exec/pass@1"] <= 1 and metrics["code_exec/num_problems"] == 2
    # the evaluation's modules are left out of the post-training data
    evaluated = set(manifests["code_exec_base"]["params"]["modules"])
    for stage in ("sft_source", "dpo_source"):
        excluded = set(manifests[stage]["params"]["exclude"])
        assert evaluated <= excluded
    export = Path(summary["stages"][-1]["artifact"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert manifests["evaluate_dpo"]["metrics"]["bits_per_byte"] > 0
