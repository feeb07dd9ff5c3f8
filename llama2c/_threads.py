"""How many threads to use by default: the cores this process may run on."""
from __future__ import annotations

import os


def _cgroup_cpu_limit() -> int | None:
    """CPU quota of the cgroup (v2 cpu.max or v1 cfs quota), rounded up; None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, -(-quota // period))
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def default_threads() -> int:
    """OMP_NUM_THREADS if set (first value of a list), else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            v = int(env)
            if v > 0:
                return v
        except ValueError:
            pass
    return available_cores()


# GNU libgomp's thread pool does not survive fork(): a child that enters a parallel region
# which the parent's pool threads used to serve waits for them forever. So a forked child runs
# the kernels on its calling thread only (OpenMP's `if` clause then never touches the pool).
_forked_child = False


def _mark_forked_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


def in_forked_child() -> bool:
    """True in a process made by fork() from one that had imported llama2c."""
    return _forked_child
