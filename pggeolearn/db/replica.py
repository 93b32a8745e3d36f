"""A hot standby of the embedded cluster: ``pg_basebackup -R`` into its own data directory.

Training reads chips, nothing else: several readers can spread over a primary and its
streaming-replication standbys (``GeoStream(dsn=[primary, standby, ...])``). This makes such a
standby next to an embedded primary, for tests and single-machine setups; on a managed server
use its own replicas. A standby serves reads only, lags the primary by what it has not
replayed yet (:func:`wait_for_replay`), and refuses every write.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pggeolearn import errors
from pggeolearn.db.cluster import SUPERUSER, Cluster, find_bindir, server_user
from pggeolearn.db.connect import connect


def make_replica(primary: Cluster, datadir: str | Path) -> Cluster:
    """Copy the running ``primary`` into ``datadir`` as a streaming standby and start it."""
    if primary.status().pid is None:
        raise errors.ClusterError(f"the primary cluster in {primary.datadir} is not running")
    replica = Cluster(datadir, port=primary.port, settings=primary.settings)
    if replica.initialized():
        raise errors.ClusterError(f"{replica.datadir} already holds a cluster")
    bindir = find_bindir()
    replica.datadir.mkdir(parents=True, exist_ok=True)
    user = server_user()
    if user is not None:
        os.chown(replica.datadir, user.pw_uid, user.pw_gid)
    os.chmod(replica.datadir, 0o700)
    replica._run([str(bindir / "pg_basebackup"), "-D", str(replica.datadir), "-h",
                  str(primary.datadir), "-p", str(primary.port), "-U", SUPERUSER, "-R",
                  "-X", "stream", "-c", "fast"])
    # the copied configuration points at the primary's socket directory: listen on our own
    with open(replica.datadir / "postgresql.conf", "a") as fh:
        fh.write(f"\n# pggeolearn standby of {primary.datadir}\n"
                 f"unix_socket_directories = '{replica.datadir}'\nhot_standby = on\n")
    replica.logfile.unlink(missing_ok=True)  # the primary's log came along, and
    for lock in replica.datadir.glob(".s.PGSQL.*"):  # its socket lock (socket dir = data dir)
        lock.unlink()
    replica._start(bindir)
    deadline = time.monotonic() + 30
    while True:
        try:
            with connect(replica.dsn("postgres"), autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return replica
        except errors.DatabaseError:
            pass
        if time.monotonic() > deadline:
            raise errors.ClusterError(f"standby in {replica.datadir} did not come up "
                                      f"(server log: {replica.logfile})")
        time.sleep(0.2)


def wait_for_replay(primary_dsn: str, standby_dsn: str, timeout_s: float = 30.0) -> None:
    """Return once the standby has replayed everything the primary had written when called."""
    with connect(primary_dsn, autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout_s
    with connect(standby_dsn, autocommit=True) as conn:
        while True:
            done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                [target]).fetchone()[0]
            if done:
                return
            if time.monotonic() > deadline:
                raise errors.ClusterError(f"standby did not replay up to {target} within "
                                          f"{timeout_s:g} s")
            time.sleep(0.05)
