"""``benchmarks/report.py``: the ``--quick`` run writes the markdown, the JSON and the PNGs with the rows it
should; HeavyBall's rows are skipped (and the report says so) when ``heavyball`` does not import;
``--resume`` reuses the finished runs; the time-to-target arithmetic on hand-made curves. Numbers are
not judged here: a quick run measures nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "report.py"

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _run(out: Path, *extra: str, hide_heavyball: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT)] + ([str(hide_heavyball)] if hide_heavyball else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(path[::-1] + [os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=280)


def _table_rows(md: str) -> list[list[str]]:
    """The headline table's data rows, as cells."""
    section = md.split("## Time to AdamW's validation loss", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| workload")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: the optimizers a plain ``--quick`` trains, and the workloads (the quick run below names the optimizers, to add
#: the chars-only ones; test_quick_defaults_are_the_three_optimizers_on_every_workload pins these defaults)
QUICK_DEFAULT = ("AdamW", "SOAA", "EGN")
CHARS_ONLY = ("ASGO-parts", "Muon-split")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``--quick`` report of every workload for the default quick optimizers and two chars-only ones,
    shared by the tests below: a report process (start-up, interleaved step timing, step cost, state per rank,
    plots) costs far more than the runs these add, and each test reads a different part of its output."""
    out = tmp_path_factory.mktemp("quick_report")
    proc = _run(out, "--optimizers", *QUICK_DEFAULT, *CHARS_ONLY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_quick_defaults_are_the_three_optimizers_on_every_workload() -> None:
    """What a plain ``--quick`` runs: the quick report above names these explicitly."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    args = report._args(["--quick", "--out", "unused"])
    assert tuple(args.optimizers) == QUICK_DEFAULT and args.workloads == ["digits", "lstsq", "chars"]
    assert (args.seeds, args.jobs, args.skip_step_cost, args.skip_state) == (1, 1, False, False)


def test_quick_report_writes_markdown_json_and_plots(quick_report: Path) -> None:
    md = (quick_report / "report.md").read_text()
    rows = _table_rows(md)
    got = {(r[0], r[1]) for r in rows}
    want = {(w, o) for w in ("digits", "lstsq", "chars") for o in QUICK_DEFAULT
            if not (o == "EGN" and w == "chars")} | {("chars", o) for o in CHARS_ONLY}
    assert got == want and len(rows) == len(want)
    assert all(r[5] != "not reached" for r in rows if r[1] == "AdamW"), "AdamW reaches its own final loss"
    for name in ("headline", "digits", "lstsq", "chars"):
        assert _is_png(quick_report / f"report_{name}.png"), name
        assert f"report_{name}.png" in md
    assert "CPU time of the process" in md and "1 torch thread per run" in md
    assert "## Step cost against the bandwidth bound" in md and "| soaa |" in md and "GB/s" in md
    assert "## Optimizer state per rank vs W" in md and "| SOAA |" in md
    rep = json.loads((quick_report / "report.json").read_text())
    assert {r["optimizer"] for r in rep["runs"]} == {*QUICK_DEFAULT, *CHARS_ONLY}
    assert all("error" not in r for r in rep["runs"]), [r["error"] for r in rep["runs"] if "error" in r]


def test_report_without_heavyball_says_so_and_skips_its_rows(tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "heavyball.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "out"
    proc = _run(out, "--workloads", "lstsq", "--optimizers", "AdamW", "SOAP", "PSGD", "--skip-step-cost",
                "--skip-state", hide_heavyball=hide)
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "report.md").read_text()
    assert "HeavyBall is not installed" in md and "hidden by the test" in md
    assert [(r[0], r[1]) for r in _table_rows(md)] == [("lstsq", "AdamW")]
    assert "## Step cost" not in md and "## Optimizer state" not in md
    # --resume reads the finished runs back instead of training again, and says so
    runs_file = out / "report_runs.jsonl"
    before = runs_file.read_text()
    assert len(before.splitlines()) == 2  # AdamW's two quick lrs, seed 0
    proc = _run(out, "--workloads", "lstsq", "--optimizers", "AdamW", "--skip-step-cost", "--skip-state",
                "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert runs_file.read_text() == before
    resumed_md = (out / "report.md").read_text()
    assert "read back from an earlier invocation" in resumed_md
    ids = {json.loads(line)["invocation"] for line in before.splitlines()}
    assert len(ids) == 1 and "within this one run" in resumed_md  # every run from that one invocation


def _fake_run(opt: str, seed: int, lr: float, vals: list[float], ms: float = 1.0) -> dict[str, Any]:
    steps = [10 * i for i in range(len(vals))]
    return {"workload": "w", "optimizer": opt, "seed": seed, "lr": lr, "step": steps,
            "cpu_s": [s * ms / 1e3 for s in steps], "val": vals, "final": vals[-1], "ms_per_step": ms}


def test_time_to_target_is_read_off_the_seed_mean_curve() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    runs = [
        _fake_run("AdamW", 0, 1e-3, [4.0, 3.0, 2.5, 2.2]), _fake_run("AdamW", 0, 3e-3, [4.0, 2.0, 1.5, 1.0]),
        _fake_run("AdamW", 1, 3e-3, [4.0, 2.4, 1.7, 1.4]),  # target: mean(1.0, 1.4) = 1.2, reached at step 30
        _fake_run("SOAA", 0, 1e-3, [4.0, 1.5, 1.0, 0.9], ms=3.0),  # mean (1.5+1.1)/2 = 1.3 at 10, 1.05 at 20
        _fake_run("SOAA", 1, 1e-3, [4.0, 1.1, 1.1, 1.0], ms=3.0),
        _fake_run("EGN", 0, 0.5, [4.0, math.inf]),  # diverged: never reaches
    ]
    s = report.summarise(runs, "w", ["AdamW", "SOAA", "EGN"])
    assert s["target"] == pytest.approx(1.2)
    a, o, e = s["rows"]["AdamW"], s["rows"]["SOAA"], s["rows"]["EGN"]
    assert a["best_lr"] == 3e-3 and a["seeds"] == 2 and a["to_target"]["steps"] == 30
    assert o["to_target"]["steps"] == 20 and o["ratio_steps"] == pytest.approx(20 / 30)
    assert o["ratio_cpu"] == pytest.approx((20 * 3.0) / (30 * 1.0))
    assert o["seeds_reaching"] == 2 and a["seeds_reaching"] == 1
    assert e["to_target"] is None and e["ratio_cpu"] is None and e["final_mean"] == math.inf


def test_best_lr_is_the_fewest_steps_to_target_except_for_adamw() -> None:
    """AdamW's lr by its final loss (its seeds set the target); another optimizer's by seed 0's steps to
    that target, not by its final loss; ties and grids that never reach it by the final loss."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    runs = [
        _fake_run("AdamW", 0, 1e-3, [4.0, 1.9, 1.2, 1.1]),  # reaches the target sooner but ends higher
        _fake_run("AdamW", 0, 3e-3, [4.0, 2.0, 1.5, 1.0]),
        _fake_run("AdamW", 1, 3e-3, [4.0, 2.4, 1.7, 1.4]),  # target 1.2
        _fake_run("SOAA", 0, 1e-3, [4.0, 1.1, 1.0, 0.95]),  # reaches at 10, ends higher
        _fake_run("SOAA", 0, 3e-3, [4.0, 2.0, 1.1, 0.5]),  # lowest final, reaches at 20
        _fake_run("SOAA", 1, 1e-3, [4.0, 1.15, 1.0, 0.9]),
        _fake_run("EGN", 0, 0.5, [4.0, 3.0, 1.3]), _fake_run("EGN", 0, 1.0, [4.0, 3.0, 1.25]),  # neither
        _fake_run("ASGO", 0, 0.1, [4.0, 1.2, 1.0, 0.9]), _fake_run("ASGO", 0, 0.3, [4.0, 1.1, 1.0, 0.8]),  # tie
    ]
    s = report.summarise(runs, "w", ["AdamW", "SOAA", "EGN", "ASGO"])
    assert s["target"] == pytest.approx(1.2)
    rows = s["rows"]
    assert rows["AdamW"]["best_lr"] == 3e-3 and rows["SOAA"]["best_lr"] == 1e-3
    assert rows["SOAA"]["to_target"]["steps"] == 10 and rows["SOAA"]["seeds"] == 2
    assert rows["EGN"]["best_lr"] == 1.0 and rows["ASGO"]["best_lr"] == 0.3
    seed0 = [r for r in runs if r["optimizer"] == "SOAA" and r["seed"] == 0]
    assert report.best_lr(seed0, None) == 3e-3  # the final-loss rule, which picked the slower lr
    # a run that reached the target first and then diverged is not picked over one that finished (reviewer)
    diverged = [_fake_run("SOAA", 0, 1e-2, [4.0, 1.1, math.inf]), _fake_run("SOAA", 0, 3e-3, [4.0, 2.0, 1.1, 0.9])]
    assert report.best_lr(diverged, 1.2) == 3e-3


def test_same_run_is_decided_by_invocation_ids_not_by_finish_times() -> None:
    """Two invocations within the same minutes are two runs; one invocation whose optimizers finished at
    different minutes is one; runs that recorded no invocation are never claimed to be one run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    span = "2026-11-30 14:45 UTC to 2026-11-30 14:48 UTC"
    two = {"resumed": True, "measured": {"AdamW": span, "SOAA": span},
           "invocations": ["2026-11-30T14:45:01Z-aaaa0000", "2026-11-30T14:45:02Z-bbbb1111"]}
    assert "different invocations" in report._same_run(two)
    one = {"resumed": True, "measured": {"AdamW": "2026-11-30 14:45 UTC", "SOAA": span},
           "invocations": ["2026-11-30T14:45:01Z-aaaa0000"]}
    assert report._same_run(one) == "the ratios are taken within this one run."
    old = {"resumed": True, "measured": {"AdamW": "an earlier invocation (time not recorded)"},
           "invocations": [report.UNRECORDED]}
    assert "different or unrecorded invocations" in report._same_run(old)
    assert "different or unrecorded" in report._same_run({k: v for k, v in old.items() if k != "invocations"})
    fresh = {**two, "resumed": False}  # without --resume every run is this invocation's
    assert report._same_run(fresh) == "the ratios are taken within this one run."


def test_split_qkv_model_computes_the_fused_models_function() -> None:
    """``Muon-split``'s model: each fused ``qkv`` Linear(d, 3d) as three Linear(d, d) copied from its row
    blocks, the same function at initialisation, without drawing from the seeded random stream."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report_runs as R
    import torch

    fused = R.model_for("chars", 0)
    after_fused = torch.get_rng_state()
    split = R.model_for("chars", 0, split=True)
    assert torch.equal(torch.get_rng_state(), after_fused)
    names = [n for n, _ in split.named_parameters()]
    assert not any(n.endswith("qkv.weight") for n in names)
    assert sum(n.endswith(".weight") and ".qkv.parts." in n for n in names) == 3 * len(fused.blocks)
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in fused.parameters())
    x = torch.randint(0, 103, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    assert R.applies("ASGO-parts", "chars") and R.applies("Muon-split", "chars")
    assert not any(R.applies(o, w) for o in R.CHARS_ONLY for w in ("digits", "lstsq"))
    with pytest.raises(ValueError, match="split model"):
        R.build("Muon-split", fused, 1e-2, R.WORKLOADS["chars"])


def test_quick_report_has_the_chars_only_rows_on_chars_only(quick_report: Path) -> None:
    md = (quick_report / "report.md").read_text()
    want = [("digits", o) for o in QUICK_DEFAULT] + [("lstsq", o) for o in QUICK_DEFAULT] + \
        [("chars", "AdamW"), ("chars", "SOAA"), ("chars", "ASGO-parts"), ("chars", "Muon-split")]
    assert [(r[0], r[1]) for r in _table_rows(md)] == want
    assert "| chars | Muon-split | 2 x 3 |" in md  # its split model timed in the interleaved rounds too


def test_the_adamw_row_is_torchs_fused_adamw_not_the_registrys() -> None:
    """The report's baseline is torch's ``AdamW(fused=True)`` (its method section says so, and issue 14's ratios are
    against it); the registry's ``AdamW`` is the package's ShardedAdamW, which the row took for a week."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report_runs as R
    import torch

    model = R.model_for("lstsq", 0)
    opts, _ = R.build("AdamW", model, 1e-2, R.WORKLOADS["lstsq"])
    assert len(opts) == 1 and type(opts[0]) is torch.optim.AdamW
    assert opts[0].defaults["fused"] is True and opts[0].defaults["weight_decay"] == 0.0
