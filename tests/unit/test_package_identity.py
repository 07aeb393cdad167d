"""The construction check's package identity and block-table fields (agreement.py), in one process: what a
healthy job's ranks share digests alike, what another version or a patched copy digests differently. The
W = 2 refusals are in tests/distributed/test_foundation_distributed.py and tests/conformance/test_ranks.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import lightning_soaa
from lightning_soaa.distributed import agreement
from lightning_soaa.distributed.blocks import BlockSpec, BlockTable
from lightning_soaa.optim.adamw import ShardedAdamW

ROOT = Path(lightning_soaa.__file__).resolve().parent


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package's source files copied elsewhere, as a wheel installs them (no caches, no build outputs)."""
    out = tmp_path / "site-packages" / "lightning_soaa"
    shutil.copytree(ROOT, out, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    return out


def test_a_copy_elsewhere_with_caches_and_other_line_endings_digests_alike(copy: Path) -> None:
    (copy / "optim" / "__pycache__").mkdir(exist_ok=True)
    (copy / "optim" / "__pycache__" / "adamw.cpython-311.pyc").write_bytes(b"\x00compiled")
    (copy / "optim" / "__pycache__" / "stale.py").write_text("x = 1\n")  # inside a cache: not source
    (copy / "kernels" / "soaa_cpu-abc.so").write_bytes(b"\x7fELF")
    crlf = copy / "optim" / "adamw.py"  # a checkout with CRLF line endings
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    assert agreement.source_digest(copy) == agreement.source_digest(ROOT) == agreement.package_identity()[1]


@pytest.mark.parametrize("change", ["comment", "kernel", "new module", "renamed"])
def test_a_patched_copy_digests_differently(copy: Path, change: str) -> None:
    if change == "comment":
        with open(copy / "functional" / "adamw.py", "a") as f:
            f.write("# patched\n")
    elif change == "kernel":
        with open(copy / "kernels" / "soaa_cpu.c", "a") as f:
            f.write("/* patched */\n")
    elif change == "new module":
        (copy / "optim" / "scratch.py").write_text("")
    else:
        (copy / "optim" / "adamw.py").rename(copy / "optim" / "adamw2.py")
    assert agreement.source_digest(copy) != agreement.source_digest(ROOT)


def test_the_identity_is_computed_once_and_names_the_version() -> None:
    first = agreement.package_identity()
    assert first[0] == lightning_soaa.__version__ and 0 <= first[1] < 1 << 48
    assert agreement.package_identity() is first  # cached: the construction check reads no file again


def _table(owners_rank: int, shard: bool, max_numel: int = 4) -> BlockTable:
    params = [torch.zeros(6, 2), torch.zeros(3)]
    specs = [[BlockSpec(0, 0, 2, 4.0), BlockSpec(0, 2, 6, 8.0)], [BlockSpec(None, 0, 0, float(max_numel))]]
    return BlockTable(params, [0, 0], specs, world_size=2 if shard else 1, rank=owners_rank, shard=shard)


def test_the_table_field_reads_the_blocks_and_their_owners() -> None:
    assert agreement.table_text(_table(0, True)) == agreement.table_text(_table(1, True))  # the table, not the rank
    assert agreement.table_text(_table(0, False)) == agreement.table_text(_table(1, False))  # own rank: not read
    other_cost = _table(0, True, max_numel=40)  # the same cuts, other owners
    assert [b.owner for b in other_cost.blocks] != [b.owner for b in _table(0, True).blocks]
    assert agreement.table_text(other_cost) != agreement.table_text(_table(0, True))


def test_the_construction_row_has_a_fixed_width_and_names_the_source_first() -> None:
    opt = ShardedAdamW([torch.nn.Parameter(torch.zeros(4, 2))], lr=0.1)
    row = agreement.construction_digests(opt, opt._params, [None], 0, table=opt.block_table)
    assert row.shape == (agreement.CONSTRUCTION_WIDTH - 1,) and opt.construction_width() == agreement.CONSTRUCTION_WIDTH
    assert int(row[agreement.CONSTRUCTION_FIELDS.index("lightning_soaa source")]) == agreement.package_identity()[1]
    skewed = row.clone()
    skewed[0] += 1
    skewed[agreement.CONSTRUCTION_FIELDS.index("block table (blocks and their owners)")] += 1
    with pytest.raises(RuntimeError, match=r"every rank must run the same lightning_soaa: rank\(s\) \[1\] run the "
                                           r"same version as rank 0 but a different source"):
        agreement.check_construction(opt, torch.stack([row, skewed]))
    agreement.check_construction(opt, torch.stack([row, row]))
