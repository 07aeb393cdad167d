"""engine.save_checkpoint / load_checkpoint with our client optimizer: bit-identical resume at every
ZeRO stage, world-size independent resume at stage 0, and a clear error for ZeRO-1/2/3 state loaded at
another world size."""

from __future__ import annotations

import pytest
import torch

from tests.deepspeed._workers import (
    w_checkpoint,
    w_client_state_global_steps,
    w_cross_precision,
    w_cross_stage,
    w_latest_after_a_failed_save,
    w_leave_deepspeed,
    w_leave_deepspeed_bf16,
    w_mixed_saves_refused,
    w_node_local_refusal,
    w_own_tag_saved_again,
    w_resume_other_world,
    w_round_robin_resume,
    w_state_dict_one_rank,
    w_torn_save,
    w_unreadable_optimizer_file,
    w_zero3_other_dp_size,
    w_zero3_saved_on_fewer_ranks,
)
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(240)]


def _opt() -> tuple[str, dict]:
    try:
        from lightning_soaa.optim.soaa import SOAA  # noqa: F401
    except ImportError:  # SOAA has global state (trust region) worth round-tripping; AdamW otherwise
        return "lightning_soaa.AdamW", {"lr": 1e-2, "weight_decay": 0.1}
    return "lightning_soaa.SOAA", {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10}


def test_round_trip_bit_identical_every_stage_then_other_world_size(tmp_path):
    opt_type, params = _opt()
    ckpt = tmp_path / "ckpt"
    res = run_distributed(w_checkpoint, 2, tmp_path, str(ckpt), [0, 1, 2, 3], opt_type, params, "fp32",
                          timeout=200)
    for rank_res in res:
        for stage, runs in rank_res.items():
            a, b = runs["A"], runs["B"]
            for x, y in zip(a["params"], b["params"]):
                assert torch.equal(x, y), f"stage {stage}: resumed run differs"
            if opt_type.endswith("SOAA"):
                for key in ("t", "d", "loss_ema", "fisher_scale", "predicted_reduction"):
                    assert a["stats"][key] == b["stats"][key], (stage, key)
    # Resume on 1 rank what 2 ranks wrote.
    (other,) = run_distributed(w_resume_other_world, 1, tmp_path, str(ckpt), opt_type, params, timeout=120)
    assert other[0]["ok"], other[0].get("error")
    if opt_type.endswith("SOAA"):
        assert other[0]["stats"]["t"] == 3
    assert not other[2]["ok"]
    msg = other[2]["error"]
    assert "world size" in msg.lower() or "ranks" in msg.lower(), msg


def test_state_dict_on_one_rank_raises_instead_of_hanging(tmp_path):
    """Stage 0 (our sharding), W=2: ``engine.optimizer.state_dict()`` on rank 0 alone hung (it consolidated,
    a collective the other rank never entered). It now raises like the base optimizer, naming what works;
    engine.save_checkpoint (every rank) and consolidate_state_dict() on every rank keep working."""
    res = run_distributed(w_state_dict_one_rank, 2, tmp_path, str(tmp_path / "ckpt"), timeout=90)
    for name in ("AdamW", "EGN"):
        msg = res[0][name]["alone"]
        assert "state_dict() at ZeRO stage 0 on several ranks" in msg, msg
        assert "engine.save_checkpoint" in msg and "consolidate_state_dict() on every rank" in msg
        assert all(r[name]["saved"] for r in res)
        assert "lightning_soaa_deepspeed" in " ".join(res[0][name]["after_consolidate_keys"])


def test_checkpoint_from_another_zero_stage_names_both_stages(tmp_path):
    """Same W, another ZeRO stage: 2 -> 0 said "not a lightning_soaa DeepSpeed optimizer state", 3 -> 0 was a
    bare AssertionError, 0 -> 2 a FileNotFoundError. Each now names both stages and what works."""
    pairs = [(2, 0), (3, 0), (0, 2), (0, 3), (3, 2)]
    res = run_distributed(w_cross_stage, 2, tmp_path, str(tmp_path / "ckpt"), pairs, timeout=200)
    for r in res:
        for saved, stage in pairs:
            msg = r[(saved, stage)]
            assert msg.startswith("StateLayoutError:"), (saved, stage, msg)
            assert f"was written under ZeRO-{saved}; this engine runs ZeRO-{stage}" in msg, msg
            assert f"Resume with zero_optimization.stage={saved}" in msg, msg
        assert "load_optimizer_states=False" in r[(2, 0)] and "zero_to_fp32.py" in r[(3, 0)]
        assert r[("module", 0, 2)] == "ok"


def test_checkpoint_saved_with_bf16_on_or_off_names_both_on_every_rank(tmp_path):
    """Optimizer state saved with bf16 off and loaded by a bf16 engine, or the other way round: ZeRO-0 said
    ``KeyError: 'dynamic_loss_scale'`` (fp32 -> bf16) or "not a lightning_soaa DeepSpeed optimizer state" (bf16
    -> fp32), ZeRO-2 a FileNotFoundError for the other precision's file names. Each now names both settings and
    what works, on every rank; the module alone still loads."""
    cases = [(0, "fp32", "bf16"), (0, "bf16", "fp32"), (2, "fp32", "bf16")]
    res = run_distributed(w_cross_precision, 2, tmp_path, str(tmp_path / "ckpt"), cases, timeout=200)
    shown = {"bf16": "bf16.enabled=true", "fp32": "bf16 off (fp32 or fp16)"}
    for r in res:
        for stage, saved, loading in cases:
            msg = r[(stage, saved, loading)]
            assert msg.startswith("StateLayoutError:"), (stage, saved, loading, msg)
            assert f"was written with {shown[saved]}; this engine runs with {shown[loading]}" in msg, msg
            assert f"Resume with bf16.enabled={str(saved == 'bf16').lower()}" in msg, msg
            assert r[("module", stage, saved, loading)] == "ok", r[("module", stage, saved, loading)]


def test_a_deepspeed_checkpoint_loaded_without_deepspeed_says_where_the_state_is(tmp_path):
    """A run leaving DeepSpeed: the optimizer entry engine.save_checkpoint wrote, loaded into the plain SOAA, was
    refused as a state torch's DCP options had rebuilt. It now says what it is: at ZeRO-0 where the optimizer's
    own state is (which then continues as the engine did), at ZeRO-2 that there is none to continue."""
    res = run_distributed(w_leave_deepspeed, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r in res:
        assert "state_dict['lightning_soaa_deepspeed']['inner']" in r["as_saved"], r["as_saved"]
        assert "DCP" not in r["as_saved"] and "flatten" not in r["as_saved"], r["as_saved"]
        assert "at ZeRO-2: DeepSpeed's per-partition state" in r["zero2"], r["zero2"]
        for a, b in zip(r["inner"], r["ds"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # float32, another summation order


def test_a_bf16_deepspeed_checkpoint_loaded_without_deepspeed_says_where_the_state_is(tmp_path):
    """A bf16 run leaving DeepSpeed: at ZeRO-0 engine.save_checkpoint's optimizer entry is DeepSpeed's bf16
    wrapper state, which holds the client's under 'optimizer_state_dict' (the path the README gave,
    ['lightning_soaa_deepspeed']['inner'], was a KeyError there), and loaded as saved it was refused as "not a
    lightning_soaa optimizer state" and no more. It now names the nested path, which loads; a ZeRO-1 file's
    wrapped entry says that it is per-partition state."""
    res = run_distributed(w_leave_deepspeed_bf16, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r in res:
        path = "state_dict['optimizer_state_dict']['lightning_soaa_deepspeed']['inner']"
        assert path in r[0], r[0]
        assert "at ZeRO-1: DeepSpeed's per-partition state" in r[1], r[1]
        assert r["inner_steps"] == 3, r


@pytest.mark.parametrize("opt_type", ["lightning_soaa.ASGO", "lightning_soaa.SOAA"])
def test_checkpoint_across_a_round_robin_change_is_refused(tmp_path, opt_type):
    """ZeRO-1/2's ``round_robin_gradients`` changes which entries each flat partition holds, so a checkpoint
    written with the other setting put its per-partition state (and DeepSpeed's fp32 partitions) on other
    parameters' entries, silently. Refused before anything is loaded, naming the option and both values; the
    same setting resumes to the uninterrupted run (both layouts, the structured and the elementwise)."""
    res = run_distributed(w_round_robin_resume, 2, tmp_path, str(tmp_path / "ckpt"), opt_type, timeout=200)
    for r in res:
        for rr in (False, True):
            resumed, straight = r[(rr, rr)], r[("uninterrupted", rr)]
            assert not isinstance(resumed, str), resumed
            assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
            msg = r[(rr, not rr)]
            assert msg.startswith("StateLayoutError:"), msg
            assert (f"written with zero_optimization.round_robin_gradients={str(rr).lower()}; this engine runs "
                    f"with {str(not rr).lower()}") in msg, msg
            assert "load_optimizer_states=False" in msg


def test_a_refusal_from_rank_0s_files_is_raised_on_every_rank(tmp_path):
    """The stage and group checks read rank 0's files; a rank without them (node-local storage) passed its
    checks and went into DeepSpeed's load while rank 0 raised. Every rank now raises, naming rank 0's
    refusal."""
    res = run_distributed(w_node_local_refusal, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    assert "was written under ZeRO-0; this engine runs ZeRO-2" in res[0], res[0]
    assert res[1].startswith("StateLayoutError: Rank 0 refused the checkpoint"), res[1]
    assert "was written under ZeRO-0" in res[1], res[1]
    for said in res:  # the file named is on rank 0's node: the message says who read it
        assert "mp_rank_00_model_states.pt, read by rank 0" in said, said


def test_latest_keeps_naming_the_last_complete_checkpoint_when_a_rank_fails_its_write(tmp_path):
    """Found by a hunter: DeepSpeed writes ``latest`` on rank 0 before its save's last barrier, so a rank
    killed while writing its ZeRO optimizer file left ``latest`` naming a checkpoint with a truncated file
    (the next load failed on that rank only). ``latest`` now moves only once every rank's save returned."""
    res = run_distributed(w_latest_after_a_failed_save, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    assert res[1][0].startswith("OSError: disk gone"), res
    assert res[0][1] == res[1][1] == "t1", res


def test_a_checkpoint_mixing_two_saves_of_one_tag_is_refused_at_load_on_every_rank(tmp_path):
    """Found by a hunter: a tag saved twice into one folder, where a rank stopped before it rewrote its ZeRO
    optimizer file, mixed the two saves' files; the load passed and the first step() blamed a load on some
    ranks only. The load now refuses it on every rank, naming the files' steps and the cause."""
    res = run_distributed(w_mixed_saves_refused, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r, said in enumerate(res):
        assert said.startswith("StateLayoutError: "), (r, said)
        assert "optimizer files written at different steps (training steps by rank: [3, 1])" in said, (r, said)
        assert "overwritten in part" in said and "previous checkpoint" in said, (r, said)


def test_an_unreadable_optimizer_file_on_one_rank_is_refused_on_every_rank(tmp_path):
    """Found by a hunter: tag t saved again into its folder, rank 1 killed while it wrote its ZeRO optimizer
    file (``latest`` still names t). The checks passed over the truncated file; rank 1 failed in DeepSpeed's
    load, after the module was loaded, and rank 0 went on. Every rank now refuses, naming rank 1 and its file,
    with the live engine left as it was; a file an older save wrote (torch's legacy serialization, no global
    step recorded) is readable and still loads."""
    res = run_distributed(w_unreadable_optimizer_file, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r, said in enumerate(res):
        assert said["older"] == ("loaded", 1, 1), (r, said["older"])
        refused = said["truncated"]
        assert refused["unchanged"], (r, refused)
        msg = refused["said"]
        assert "Rank 1 could not read its ZeRO optimizer file" in msg, (r, msg)
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in msg and "truncated or damaged" in msg, (r, msg)
        assert "Nothing was loaded" in msg, (r, msg)
    assert res[0]["truncated"]["said"].startswith("StateLayoutError: Rank 1 refused the checkpoint"), res[0]
    assert res[1]["truncated"]["said"].startswith("UnreadableCheckpointError: "), res[1]


def test_a_save_torn_between_the_model_and_the_optimizer_files_is_refused_on_every_rank(tmp_path):
    """Rank 0 writes the model-states file (with DeepSpeed's global step) before the ZeRO optimizer files; a
    save into an existing tag stopped between the two left the module of one step beside the optimizer state
    of another, and the load took both. Refused on every rank, naming both steps; nothing changes."""
    res = run_distributed(w_torn_save, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r, said in enumerate(res):
        for case, (model, optim) in (("model ahead", (3, 1)), ("optimizer ahead", (5, 7))):
            refused = said[case]
            assert refused["unchanged"], (r, case, refused)
            msg = refused["said"]
            assert msg.startswith("StateLayoutError: "), (r, case, msg)
            assert (f"its model-states file mp_rank_00_model_states.pt was written at global step {model}, its "
                    f"ZeRO optimizer files at global step {optim}") in msg, (r, case, msg)
            assert "Nothing was loaded" in msg and "previous checkpoint" in msg, (r, case, msg)


def test_a_save_whose_client_state_sets_global_steps_loads(tmp_path):
    """DeepSpeed writes ``client_state`` over its own keys of the model-states file, ``global_steps`` included
    (its load then sets the engine's step from it). The torn-save check compared that value with the engine's
    step recorded in the optimizer files and refused every such checkpoint as two saves; it now records the
    value DeepSpeed writes."""
    res = run_distributed(w_client_state_global_steps, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r, said in enumerate(res):
        assert said == {"said": "loaded", "steps": (12, 3)}, (r, said)


def test_a_file_holding_a_class_this_process_lacks_is_named_as_such(tmp_path, monkeypatch):
    """A checkpoint file that unpickles an object of a class this process cannot import (a user's class
    saved through client_state) was refused as "truncated or damaged" with "resume from the previous
    checkpoint" (a reviewer): it is named as the missing class, with the remedy; a cut file stays damaged."""
    import sys

    from deepspeed_ext.engine import UnreadableCheckpointError, _read_checkpoint_file

    (tmp_path / "users_steps.py").write_text("class Counter:\n    n = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import users_steps  # type: ignore[import-not-found]

    path = tmp_path / "model_states.pt"
    torch.save({"client": users_steps.Counter()}, path)
    monkeypatch.delitem(sys.modules, "users_steps")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(UnreadableCheckpointError, match=r"Rank 1 could not unpickle the file .*ModuleNotFoundError"
                                                        r".*users_steps.*importable on every rank"):
        _read_checkpoint_file(str(path), 1, "the file")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UnreadableCheckpointError, match=r"Rank 1 could not read the file .*truncated or damaged"):
        _read_checkpoint_file(str(path), 1, "the file")


def test_a_zero3_checkpoint_saved_on_fewer_ranks_is_refused_on_every_rank(tmp_path):
    """ZeRO-3 saved at W = 2, resumed at W = 3: the ranks the save had raised DeepSpeed's "DP world size"
    error, the new rank a bare AssertionError from DeepSpeed's file list (a hunter). Every rank now raises the
    same error naming both sizes, before anything is loaded."""
    root = str(tmp_path / "ckpt")
    assert run_distributed(w_zero3_saved_on_fewer_ranks, 2, tmp_path / "save", root, timeout=200) == [
        {"said": "saved"}] * 2
    res = run_distributed(w_zero3_saved_on_fewer_ranks, 3, tmp_path / "load", root, timeout=200)
    for r, said in enumerate(res):
        assert said["unchanged"], (r, said)
        msg = said["said"]
        assert "saved on 2 data-parallel rank(s), this run has 3" in msg, (r, msg)
        assert msg.startswith("StateLayoutError: ") and "Nothing was loaded" in msg, (r, msg)
        if r == 2:
            assert "has no 'zero_pp_rank_2_mp_rank_00_model_states.pt'" in msg, msg


def test_a_zero3_checkpoint_saved_on_more_ranks_is_refused_before_anything_loads(tmp_path):
    """ZeRO-3 saved at W = 3, resumed at W = 2: DeepSpeed refused it ("DP world size of 3"), but only after its
    load had set the engine's global_steps (and skipped_steps, the lr scheduler) from the checkpoint; a run that
    caught the error went on half-resumed. Refused now on every rank before anything loads, naming both sizes."""
    root = str(tmp_path / "ckpt")
    run_distributed(w_zero3_other_dp_size, 3, tmp_path / "save", root, "save", timeout=200)
    res = run_distributed(w_zero3_other_dp_size, 2, tmp_path / "load", root, "load", timeout=200)
    for r, said in enumerate(res):
        assert said["unchanged"], (r, said)
        assert said["said"].startswith("StateLayoutError: "), (r, said)
        assert "saved on 3 data-parallel rank(s), this run has 2" in said["said"], (r, said)


def test_a_zero3_rank_without_its_files_is_refused_on_every_rank(tmp_path):
    """Node-local storage where rank 1's node lacks the checkpoint's files (a replaced node): rank 1 raised a bare
    AssertionError from DeepSpeed's file list alone while rank 0 went on into the load's collectives. Every rank
    now refuses, rank 1 naming the file it lacks."""
    root = str(tmp_path / "ckpt")
    run_distributed(w_zero3_other_dp_size, 2, tmp_path / "save", root, "save", timeout=200)
    res = run_distributed(w_zero3_other_dp_size, 2, tmp_path / "load", root, "node-local", timeout=200)
    assert "has no 'zero_pp_rank_1_mp_rank_00_model_states.pt'" in res[1]["said"], res
    assert "node-local storage" in res[1]["said"], res
    assert res[0]["said"].startswith("StateLayoutError: Rank 1 refused"), res
    assert all(r["unchanged"] for r in res), res


def test_stale_files_of_an_earlier_save_into_the_tag_are_not_judged(tmp_path):
    """One folder and tag saved twice by our optimizer (Lightning's last.ckpt: tag "checkpoint"), the second of
    another stage or precision: the stage check read the first run's mp_rank_00 file (refusing a ZeRO-3 resume as
    "written under ZeRO-2") and the group check its fp32 optimizer file (refusing a bf16 run's own groups). Both
    now read the files DeepSpeed loads (a reviewer)."""
    res = run_distributed(w_own_tag_saved_again, 2, tmp_path, str(tmp_path / "ckpt"), timeout=280)
    for r, said in enumerate(res):
        assert said == {"ZeRO-2, then ZeRO-3": "loaded", "fp32 two groups, then bf16 one group": "loaded"}, (r, said)


def test_a_zero3_weights_only_load_takes_the_tags_weights_and_refuses_another_dp_size_on_every_rank(tmp_path):
    """ZeRO-3 keeps the weights in the per-rank optimizer files (its model-states files hold empty partitions).
    load_module_only=True loaded nothing (the engine kept its own weights, silently); load_optimizer_states=False
    took the weights of the tag ``latest`` names, not of the tag asked for. Both now load the asked tag's weights.
    At another data-parallel size (saved at 2, loaded at 3) the new rank raised a bare AssertionError alone (the
    others went on into the load); every rank now refuses, naming the sizes and the way that works."""
    from tests.deepspeed._workers import WEIGHTS_ONLY, w_zero3_weights_only

    root = str(tmp_path / "ckpt")
    saved = run_distributed(w_zero3_weights_only, 2, tmp_path / "save", root, "save", timeout=200)[0]
    res = run_distributed(w_zero3_weights_only, 2, tmp_path / "load2", root, "load", timeout=200)
    for r, said in enumerate(res):
        for way in WEIGHTS_ONLY:
            assert said[way]["said"] == "loaded", (r, way, said[way]["said"])
            assert all(torch.equal(a, b) for a, b in zip(said[way]["weights"], saved)), (r, way)
    res = run_distributed(w_zero3_weights_only, 3, tmp_path / "load3", root, "load", timeout=200)
    for r, said in enumerate(res):
        for way in WEIGHTS_ONLY:
            msg = said[way]["said"]
            assert msg.startswith("StateLayoutError: "), (r, way, msg)
            assert "saved on 2 data-parallel rank(s), this run has 3" in msg, (r, way, msg)
            assert "get_fp32_state_dict_from_zero_checkpoint" in msg and "Nothing was loaded" in msg, (r, way, msg)
            assert said[way]["unchanged"] and said[way]["steps"] == 0, (r, way)


def test_latest_on_rank_0s_node_only_is_agreed_on_every_rank(tmp_path):
    """Node-local storage: DeepSpeed writes ``latest`` on global rank 0 only, so a load with tag=None on another
    node's rank found none, warned and returned without loading, while rank 0 loaded: the ranks trained on from
    different weights and steps. Ranks without ``latest`` now load the tag rank 0's names; copies of ``latest``
    naming different tags are refused on every rank."""
    from tests.deepspeed._workers import w_latest_on_rank_0s_node_only

    res = run_distributed(w_latest_on_rank_0s_node_only, 2, tmp_path, str(tmp_path / "ckpt"), timeout=200)
    for r, said in enumerate(res):
        assert said["missing"]["said"] == "loaded" and said["missing"]["steps"] == 2, (r, said["missing"])
        assert all(torch.equal(a, b) for a, b in zip(said["missing"]["weights"], said["saved"])), r
        msg = said["other"]["said"]
        assert msg.startswith("StateLayoutError: ") and "'latest'" in msg, (r, msg)
        assert "rank 0: 't1'" in msg and "rank 1: 't0'" in msg and "tag=" in msg, (r, msg)


def test_a_zero3_weights_only_load_with_frozen_parameters_at_a_smaller_dp_size_is_refused_before_loading(tmp_path):
    """A ZeRO-3 weights-only load at a smaller data-parallel size (saved at 2, loaded at 1) of a checkpoint with
    frozen parameters: DeepSpeed's load copies each rank's saved fragment of a frozen parameter over its partition,
    of another size there; it raised a bare RuntimeError ("The size of tensor a (48) must match the size of tensor b
    (24)") after the trainable weights were loaded and before their fp32 masters were (a step after it went on from
    the old masters). Refused before anything is loaded, naming the frozen parameters and the way that works."""
    from tests.deepspeed._workers import WEIGHTS_ONLY, w_zero3_frozen_weights_only

    root = str(tmp_path / "ckpt")
    run_distributed(w_zero3_frozen_weights_only, 2, tmp_path / "save", root, "save", timeout=200)
    said = run_distributed(w_zero3_frozen_weights_only, 1, tmp_path / "load", root, "load", timeout=200)[0]
    for way in WEIGHTS_ONLY:
        msg = said[way]["said"]
        assert msg.startswith("StateLayoutError: ") and "frozen parameters (0.weight, 0.bias)" in msg, (way, msg)
        assert "saved on 2 data-parallel rank(s), this run has 1" in msg and "Nothing was loaded" in msg, (way, msg)
        assert said[way]["unchanged"] and said[way]["steps"] == 0, (way, said[way])
