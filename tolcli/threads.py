"""How many CPU threads torch computes with: ``--threads N`` on every compute command.

torch parallelises CPU work on two pools:

- the **intra-op** pool (OpenMP on the CPU builds tolcli installs): one matmul, one elementwise kernel split
  across threads. :func:`torch.set_num_threads` sizes it for this process. ``OMP_NUM_THREADS`` sets the same
  pool's size, but only when read, at the OpenMP runtime's start-up (before the first parallel kernel), and
  it also reaches every other OpenMP library in the process (numpy's BLAS in some builds);
- the **inter-op** pool (``torch.jit.fork``, some parallel loaders). :func:`torch.set_num_interop_threads`
  sizes it, once per process and only before any inter-op work has started (``OMP_NUM_THREADS`` does not).

By default torch takes one intra-op thread per physical core. On a machine shared with other jobs (a CI runner,
a desktop running a build) those threads contend with the other load: OpenMP threads spin-wait at every barrier,
and one descheduled thread stalls a whole kernel. Fewer threads than cores is then often faster
(``docs/ci.md``). :func:`set_threads` applies both pools' sizes from Python, so it works in a process that has
already imported torch, where setting ``OMP_NUM_THREADS`` would be too late.
"""

from __future__ import annotations

import contextlib

from tolcli.errors import UsageError

_interop_set = False  # torch accepts set_num_interop_threads once per process


def check_threads(n: object) -> int:
    """``n`` as a thread count (an int >= 1), or a usage error naming `threads`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"`threads` must be an integer >= 1, got {n!r}")
    return n


def set_threads(n: int) -> int:
    """Compute with ``n`` CPU threads in this process (torch's intra-op pool; the inter-op pool too, the first
    time and while torch still allows it). Returns the intra-op thread count now in effect.

    Call it before any torch work: the CLI does so first thing in every compute command (``--threads``).

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> set_threads(1)
    1
    >>> set_threads(0)
    Traceback (most recent call last):
    ...
    tolcli.errors.UsageError: threads must be an integer >= 1, got 0
    >>> _ = set_threads(before)
    """
    global _interop_set
    n = check_threads(n)
    import torch

    torch.set_num_threads(n)
    if not _interop_set:
        _interop_set = True
        # RuntimeError once inter-op work has started (a library caller): the intra-op pool is what counts
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(n)
    return torch.get_num_threads()
