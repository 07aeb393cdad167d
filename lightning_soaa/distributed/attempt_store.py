"""The store of one attempt of a torchrun job (used by :func:`~lightning_soaa.distributed.launch.init_from_env`).

Restarts (``torchrun --max-restarts=K``): torchrun's agent keeps one TCP store for the whole job, and the
workers of every attempt meet in it. The keys a process group leaves there (each rank's gloo address)
outlive a dead attempt, so a restarted rank could read its dead peer's address ("Connection refused" in
``connectFullMesh``) or a stale count (a hang). The group therefore forms on a store that rank 0 of the
attempt hosts itself and announces in the agent's store (:func:`attempt_store`).
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch.distributed as dist

from lightning_soaa.distributed.store_probe import _STORE_POLL_S, _store_client

if TYPE_CHECKING:
    from lightning_soaa.distributed.launch import LaunchInfo

__all__ = ["attempt_store"]

log = logging.getLogger(__name__)

#: the key of torchrun's agent store under which rank 0 of an attempt publishes where its own store is
_ATTEMPT_KEY = "lightning_soaa/attempt_store"
#: the key in rank 0's own store that holds the nonce it published with: a store without it, or with
#: another nonce, is not this attempt's
_NONCE_KEY = "lightning_soaa/nonce"
#: the key in rank 0's own store that counts the ranks that took it: once world_size - 1 did, its group is
#: complete, and a rank that finds it later belongs to a later group (its rank 0 has not published yet)
_JOINED_KEY = "lightning_soaa/joined"
#: how long a rank gives one published address to answer before it reads the agent store's key again
_ATTEMPT_CONNECT_S = 10.0


def attempt_store(agent: dist.Store, *, rank: int, world_size: int, host: str,
                  timeout: datetime.timedelta) -> dist.Store:
    """A store that only the ranks of this attempt of a torchrun job use: rank 0 hosts it, fresh.

    torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``) lives as long as the job, and the
    workers of every attempt meet in it; the keys a process group writes there (each rank's gloo address)
    outlive a dead attempt. A restarted rank that read them connected to a dead peer's port, or hung. A key
    space per attempt must be one every rank of the attempt finds from what all of them know, and torchrun
    gives them nothing to name it: ``TORCHELASTIC_RESTART_COUNT`` is counted per node agent (an agent that
    restarts its workers because another node failed or joined does not count it; a replacement agent
    starts at 0), so ranks of one attempt carry different counts; and a count of arrivals in the store is
    left misaligned by a failed attempt whose ranks did not all arrive.

    So rank 0 hosts a store of its own on a free port, with a random nonce in it, and publishes
    ``host``, port and nonce under one key of ``agent``. Every other rank reads that key, connects, and
    takes the store only if it holds the published nonce, is for its world size and has not been taken by
    ``world_size - 1`` ranks already. A value that an earlier group left is waited past: a dead attempt's
    (its port refuses, or another store answers there now), and a complete group's whose rank 0 still runs
    (torchrun's static rendezvous restarts each node's workers on its own, so a node's new workers start
    while another node's old rank 0 computes; a process that destroys its group and calls
    :func:`init_from_env` again may find its old rank 0 not yet there). The group forms on rank 0's store,
    which holds no key of an earlier attempt.

    Args:
        agent: torchrun's agent store.
        rank, world_size: this process in this attempt.
        host: rank 0's address as the other ranks reach it (``MASTER_ADDR``: torchrun runs rank 0 on the
            node whose agent hosts the agent store); only rank 0's value is used.
        timeout: how long a rank waits for rank 0's store (and the store's own timeout).

    Raises:
        RuntimeError: a rank other than 0 found no store of its attempt within ``timeout``.
    """
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = secrets.token_hex(16)
        store.set(_NONCE_KEY, nonce)
        # MASTER_ADDR is rank 0's node for torchrun (its group rank 0 hosts the agent store), but torchrun keeps
        # that address from its first round: its own name too, in case the node ranks moved since
        hosts = list(dict.fromkeys((host, socket.getfqdn())))
        agent.set(_ATTEMPT_KEY, json.dumps({"hosts": hosts, "port": store.port, "nonce": nonce,
                                            "world_size": world_size}))
        log.debug("rank 0 hosts this attempt's store at %s, port %d", hosts, store.port)
        return store
    return _find_attempt_store(agent, rank, world_size, timeout)


def _find_attempt_store(agent: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The store that rank 0 of this attempt published in ``agent`` (see :func:`attempt_store`)."""
    deadline = time.monotonic() + timeout.total_seconds()
    stale: set[bytes] = set()  # values shown to be a dead attempt's: never tried again
    last = "nothing was published"
    while True:
        raw = agent.get(_ATTEMPT_KEY) if agent.check([_ATTEMPT_KEY]) else None
        if raw is not None and raw not in stale:
            found, why, final = _join_published(raw, world_size, deadline)
            if found is not None:
                found.set_timeout(timeout)
                return found
            last = f"{raw.decode(errors='replace')}: {why}"
            if final:
                log.debug("rank %d passes over a dead attempt's store, %s", rank, last)
                stale.add(raw)
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Rank {rank} found no store of rank 0 of this attempt within {timeout.total_seconds():g} s "
                f"(torchrun's agent store, key {_ATTEMPT_KEY!r}: {last}). Rank 0 did not start or failed before "
                "it published its store, or this rank cannot reach rank 0's node on that port (a firewall?).")
        time.sleep(_STORE_POLL_S)


def _join_published(raw: bytes, world_size: int, deadline: float) -> tuple[dist.Store | None, str, bool]:
    """Connect to the store ``raw`` names and check its nonce: ``(store, "", _)``, or ``(None, why, final)``,
    ``final`` when ``raw`` is shown to be a dead attempt's (a refused port may only be not yet reachable)."""
    try:
        where = json.loads(raw)
        hosts, port, nonce = [str(h) for h in where["hosts"]], int(where["port"]), str(where["nonce"])
        size = int(where["world_size"])
    except (ValueError, KeyError, TypeError):
        return None, "not a value this library writes", True
    if size != world_size:
        return None, f"a group of {size} ranks, not {world_size} (an earlier attempt's)", True
    said, final = [], True
    for host in hosts:
        seconds = max(0.1, min(_ATTEMPT_CONNECT_S, deadline - time.monotonic()))
        try:  # a plain socket first: TCPStore's own connect logs every refused try at error level
            socket.create_connection((host, port), timeout=seconds).close()
        except OSError as e:
            said.append(f"{host}: cannot connect ({e})")
            final = False  # may be only not reachable yet
            continue
        # TCPStore's handshake waits past its timeout on a port that accepts but never answers (a dead
        # attempt's port taken by another program): bounded in _store_client
        store, why = _store_client(host, port, world_size, datetime.timedelta(seconds=seconds), seconds + 1.0)
        if store is None:
            said.append(f"{host}: no store answers there ({why.splitlines()[0] if why else ''})")
        elif not store.check([_NONCE_KEY]):
            said.append(f"{host}: another store answers there (a dead attempt's port, reused)")
        elif store.get(_NONCE_KEY).decode() != nonce:
            said.append(f"{host}: another attempt's store answers there (its nonce differs)")
        elif store.add(_JOINED_KEY, 1) >= world_size:
            # its rank 0 lives on, but its group is complete: an earlier attempt's or an earlier init_from_env's
            return None, f"{host}: its {world_size - 1} other ranks took this store already (an earlier group's)", True
        else:
            return store, "", False
    return None, "; ".join(said), final


def _torchrun_store(info: LaunchInfo, env: Mapping[str, str], timeout: datetime.timedelta) -> dist.Store:
    """The store of this attempt of a torchrun job (or of any launcher that exports the ``env://`` variables).

    With ``TORCHELASTIC_USE_AGENT_STORE=True`` torchrun's agent hosts a store on ``MASTER_ADDR:MASTER_PORT``
    that every attempt shares: the ranks meet there and form the group on a store rank 0 hosts for this
    attempt (:func:`attempt_store`). Otherwise (a launcher that only exports the ``env://`` variables, or
    torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts the store at that address, as
    ``env://`` does: a new process's store, with no key of an earlier attempt in it.
    """
    assert info.master_addr is not None and info.master_port is not None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=info.rank == 0,
                             timeout=timeout, multi_tenant=True)
    agent = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    return attempt_store(agent, rank=info.rank, world_size=info.world_size, host=info.master_addr, timeout=timeout)
