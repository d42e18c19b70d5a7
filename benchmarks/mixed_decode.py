"""Mixed-precision row decoding (`mixed` codec): 4,096 random rows vs a memcpy of their decoded fp32 bytes.

Random valid layers (every class's codes, scales and offsets random; ``index`` a random permutation) with the class
mix of a 3-bit allocation, decoded by ``MixedCodec.decode_into`` into a reused buffer, from memory (``DictAccess``)
and from a safetensors bundle written by the library's writer (``Bundle.lookup_layers``). The bound is a
preallocated ``np.copyto`` of 4,096 x h fp32 values. Goal: >= 0.3x. Both times are the best of :data:`REPEAT` calls
(a call at h = 128 takes about 100 us, so a handful of calls mostly measures the other processes' interruptions); the
ratio of the medians is printed beside it. Run with ``OMP_NUM_THREADS=1`` on a shared machine; figures move with the
load average (printed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._util import best_and_median, row
from tolcli import open_bundle
from tolcli.codecs import DictAccess, codec_from_manifest
from tolcli.codecs.mixed import index_bytes
from tolcli.testing import write_layer_bundle

SHAPES = ((4_096, 128), (32_768, 2_048))  # the demo's layers; a 1B-scale width
BATCH = 4_096
GOAL = 0.3
REPEAT = 50  # calls timed per figure: the best and the median are reported
# (bits, group, share of the rows): the classes of a 3-bit allocation on the demo model
MIX = ((0, 0, 0.10), (1, 128, 0.05), (2, 128, 0.15), (3, 128, 0.30), (4, 128, 0.28), (4, 64, 0.05), (5, 128, 0.07))


def random_layer(V: int, h: int, g: np.random.Generator) -> tuple[dict, dict[str, np.ndarray]]:
    """Params and role -> stored array of one random, valid ``mixed`` layer."""
    counts = [int(share * V) for _, _, share in MIX]
    counts[3] += V - sum(counts)
    classes = [[b, grp, n] for (b, grp, _), n in zip(MIX, counts, strict=True)]
    pos = g.permutation(V).astype(np.int64)
    nb = index_bytes(V)
    arrays = {
        "index": ((pos[:, None] >> (8 * np.arange(nb))) & 0xFF).astype(np.uint8),
        "mean": g.standard_normal((1, h), dtype=np.float32),
    }
    for k, (b, grp, n) in enumerate(classes):
        if b:
            arrays[f"class{k}.codes"] = g.integers(0, 256, (n, h * b // 8), dtype=np.uint8)
            arrays[f"class{k}.scales"] = (g.random((n, h // grp), dtype=np.float32) * 0.01).astype(np.float16)
            arrays[f"class{k}.offsets"] = (-g.random((n, h // grp), dtype=np.float32) * 0.08).astype(np.float16)
    return {"target_bits": 3.0, "classes": classes}, arrays


def _line(name: str, bound: tuple[float, float], t: tuple[float, float]) -> str:
    """The best times' ratio against the goal, the medians' ratio beside it."""
    verdict = ("ok" if bound[0] / t[0] >= GOAL else "MISSED") + f" (goal >= {GOAL}x; medians {bound[1] / t[1]:.2f}x)"
    return row(name, f"{t[0] * 1e6:10.1f} us", bound[0] / t[0], verdict)


def run() -> list[str]:
    lines = [
        f"{BATCH:,} random rows per call into a reused buffer; ratio = memcpy of the fp32 rows / decode time, "
        f"best of {REPEAT} calls each"
    ]
    lines.append("load average before: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    g = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for V, h in SHAPES:
            params, arrays = random_layer(V, h, g)
            codec = codec_from_manifest("mixed", params)
            access = DictAccess({r: torch.from_numpy(a) for r, a in arrays.items()})
            ids = torch.from_numpy(g.integers(0, V, BATCH))
            out = torch.empty(BATCH, h)
            src, dst = np.ones(BATCH * h, np.float32), np.empty(BATCH * h, np.float32)
            bound = best_and_median(lambda src=src, dst=dst: np.copyto(dst, src), REPEAT)
            t_mem = best_and_median(lambda c=codec, a=access, ids=ids, out=out: c.decode_into(a, ids, out), REPEAT)
            bits = 8 * sum(a.nbytes for a in arrays.values()) / (V * h)
            lines.append(_line(f"{V:,} x {h:,} ({bits:.2f} bits/value), in memory", bound, t_mem))
            with open_bundle(write_layer_bundle(Path(d) / f"m{h}.safetensors", "mixed", params, arrays, V, h)) as b:
                buf = b.lookup_layers(ids)
                t_b = best_and_median(lambda b=b, ids=ids, buf=buf: b.lookup_layers(ids, out=buf), REPEAT)
            lines.append(_line(f"{V:,} x {h:,}, safetensors lookup_layers", bound, t_b))
    lines.append("load average after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return lines


if __name__ == "__main__":
    for line in run():
        print(line)
