"""The optimizer switched between a DeepSpeed save and the resume (found by a hunter).

* Ours -> DeepSpeed's own AdamW: the load passed silently (our client's state kept ``"state": {}`` and the real
  state under its own key, which torch's ``load_state_dict`` ignores): AdamW restarted its moments and step
  counts while taking SOAA's lr, betas and weight decay. Now refused on every rank before anything is loaded,
  naming both optimizers and the module-only load; a foreign engine with nothing of ours around it refuses the
  state by itself (a marker param group: one group too many for any torch optimizer).
* SOAA -> ASGO at ZeRO-1/2: refused as "written by ZeRO-2 on 2 ranks ... resume with the same world size and
  ZeRO config" -- the optimizer changed, not the layout. The switch is now named first.
"""

from __future__ import annotations

import pytest
import torch

from tests.deepspeed._workers import (
    w_previous_version_resumes,
    w_switch_between_ours,
    w_switch_to_foreign,
    w_tag_saved_again,
    w_wrappers_round_trip,
)
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(300)]

SOAA = {"lr": 1e-2, "betas": [0.5, 0.6], "weight_decay": 0.3, "total_steps": 10}


def test_ours_resumed_with_deepspeeds_adamw_is_refused_on_every_rank_before_anything_loads(tmp_path):
    """SOAA at ZeRO-0 and -2 (W = 2) and EGN (ZeRO-0), resumed by an engine of DeepSpeed's own AdamW: every rank
    refuses, naming the optimizer that wrote the state, the one loading it and the module-only load; the engine
    is left as it was (weights, AdamW's groups and empty state); the module-only load then takes the weights."""
    cases = [(0, "lightning_soaa.SOAA", SOAA), (2, "lightning_soaa.SOAA", SOAA),
             (0, "lightning_soaa.EGN", {"loss": "mse", "lr": 0.5})]
    res = run_distributed(w_switch_to_foreign, 2, tmp_path, str(tmp_path / "ckpt"), cases, timeout=280)
    for r, said in enumerate(res):
        for stage, opt_type, _ in cases:
            got = said[(stage, opt_type)]
            msg = got["said"]
            assert msg.startswith("OptimizerSwitchError: "), (r, stage, opt_type, msg)
            assert f"written by {opt_type}" in msg, (r, stage, msg)
            assert "this engine's optimizer is torch.optim.adamw.AdamW" in msg, (r, stage, msg)
            assert "load_optimizer_states=False" in msg and "Nothing was loaded" in msg, (r, stage, msg)
            assert got["unchanged"], (r, stage, opt_type)
            assert got["module_only"], (r, stage, opt_type)


def test_a_switch_between_our_optimizers_is_named_as_such_at_every_zero_stage(tmp_path):
    """SOAA saved, ASGO resuming at the same stage and world size. ZeRO-1/2 said "written by ZeRO-2 on 2 ranks
    ... resume with the same world size and ZeRO config"; every stage now names the switch, on every rank, from
    the engine's load and (ZeRO-2) from the client's own load_state_dict. DeepSpeed's own AdamW's state loaded by
    SOAA failed in the client's load after DeepSpeed had loaded the module; now refused before, naming both."""
    stages = [0, 1, 2, 3]
    res = run_distributed(w_switch_between_ours, 2, tmp_path, str(tmp_path / "ckpt"), stages, timeout=280)
    for r, said in enumerate(res):
        for key in [*stages, "client"]:
            msg = said[key]
            assert msg.startswith("OptimizerSwitchError: "), (r, key, msg)
            assert "written by lightning_soaa.SOAA" in msg and "lightning_soaa.ASGO" in msg, (r, key, msg)
            assert "same world size" not in msg and "partition shapes" not in msg, (r, key, msg)
            assert "load_optimizer_states=False" in msg, (r, key, msg)
        assert "Nothing was loaded" in said[2], (r, said[2])
        msg, unchanged = said["foreign"]  # DeepSpeed's AdamW -> SOAA: refused before DeepSpeed loaded the module
        assert msg.startswith("OptimizerSwitchError: "), (r, msg)
        assert "written by an optimizer that is not lightning_soaa's" in msg and "lightning_soaa.SOAA" in msg, msg
        # named from the DeepSpeed config saved with the checkpoint (DeepSpeed's own AdamW)
        assert "DeepSpeed's 'AdamW' (optimizer.type in the checkpoint's DeepSpeed config)" in msg, msg
        assert "Resume with optimizer.type 'AdamW'" in msg, msg
        assert "Nothing was loaded" in msg and unchanged, (r, msg)


def test_every_deepspeed_wrapper_resumes_ours_and_refuses_a_foreign_optimizer_by_itself(tmp_path):
    """The saved state carries a marker param group. Through each of DeepSpeed's optimizer wrappers (ZeRO 0-3,
    bf16; fp16 at ZeRO-2/3) our resume stays bit-identical to the uninterrupted run, and an engine of DeepSpeed's
    own AdamW built by deepspeed.initialize itself (none of our checks around it) refuses the state in torch's
    load_state_dict instead of taking SOAA's hyperparameters with fresh moments."""
    cases = [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp16"), (3, "fp16"), (0, "fp32")]
    res = run_distributed(w_wrappers_round_trip, 2, tmp_path, str(tmp_path / "ckpt"), cases, timeout=280)
    for r, said in enumerate(res):
        for case in cases:
            straight, resumed = said[case]["runs"]
            assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), (r, case)
            msg = said[case]["foreign"]
            assert msg.startswith("ValueError: "), (r, case, msg)
            assert "different number of parameter groups" in msg, (r, case, msg)


def test_our_checkpoints_resume_in_this_format_and_the_previous_one(tmp_path):
    """Our own resume is bit-identical to the uninterrupted run from a checkpoint in this format (with the marker
    group) and in the previous one (rewritten without it), at ZeRO-0 (the consolidated state in the model-states
    file; SOAA and EGN) and ZeRO-2 (per-rank files)."""
    cases = [(0, "lightning_soaa.SOAA", SOAA), (2, "lightning_soaa.SOAA", SOAA),
             (0, "lightning_soaa.EGN", {"loss": "mse", "lr": 0.5})]
    res = run_distributed(w_previous_version_resumes, 2, tmp_path, str(tmp_path / "ckpt"), cases, timeout=280)
    dropped = {case[:2]: said["dropped"] for case, said in res[0].items()}
    assert dropped == {(0, "lightning_soaa.SOAA"): 1, (2, "lightning_soaa.SOAA"): 2, (0, "lightning_soaa.EGN"): 1}
    for r, said in enumerate(res):
        for stage, opt_type, _ in cases:
            straight, *resumed = said[(stage, opt_type)]["runs"]
            for run in resumed:
                assert all(torch.equal(a, b) for a, b in zip(straight, run)), (r, stage, opt_type)


def test_the_files_deepspeed_loads_are_the_ones_judged_in_a_folder_saved_again(tmp_path):
    """Found by a reviewer: a folder and tag saved by a second run of another precision or stage (Lightning's
    last.ckpt saves under tag "checkpoint" every time) keeps files of the first run that DeepSpeed does not load
    (a bf16 engine loads bf16_zero_pp_rank_*; a ZeRO-3 engine its own model-states files). The check read the
    stale ones: the second run's own resume was refused as a switch from the first run's optimizer, by DeepSpeed's
    AdamW and by SOAA. It now judges the files DeepSpeed loads, in its order: the resume loads, and the first
    run's optimizer loading the second run's state is refused naming the second run's optimizer."""
    res = run_distributed(w_tag_saved_again, 2, tmp_path, str(tmp_path / "ckpt"), timeout=280)
    for r, said in enumerate(res):
        for key, msg in said.items():
            if isinstance(key, str):
                assert msg == "loaded", (r, key, msg)
                continue
            assert msg.startswith("OptimizerSwitchError: "), (r, key, msg)
            wrote = "an optimizer that is not lightning_soaa's" if "then AdamW" in key[1] else "lightning_soaa.SOAA"
            assert f"written by {wrote}" in msg, (r, key, msg)
