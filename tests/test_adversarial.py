"""A bounded adversarial corpus (tests/adversarial/corpus.py): 1,000 deterministic hostile inputs across JSON hazards
(manifests in both containers, safetensors headers, shard indexes, config.json, checkpoint indexes, tensor maps,
.jsonl), HDF5 link graphs and declared sizes, and manifests that lie with consistent hashes.

Every case is read through the library's entry points (open_bundle + verify + lookup, open_checkpoint,
read_tokens) and must either succeed with the right data, or raise a TolcliError subclass. Never another exception,
never more than :data:`CASE_SECONDS`, and never a wrong answer: whenever verify passes, every lookup equals what a
runtime following docs/bundle-format.md reads from the same file (an independent reader, not tolcli's), and, for
manifests that lie, equals the data written, or else the bundle is another valid bundle (a codec relabelled to one
with the same tensors) whose published sha256 differs from the honest one's (docs/bundle-format.md, "Integrity").
The counts are printed (run with ``-s``) and recorded as the test's ``adversarial_counts`` property.
"""

from __future__ import annotations

import random
import time
import traceback
from collections import Counter
from pathlib import Path

from tests.adversarial import Hang, deadline
from tests.adversarial.corpus import Case, H5Family, JsonFamily, LieFamily, WrongAnswer
from tolcli.errors import TolcliError
from tolcli.testing import tiny_config, write_random_checkpoint

SEED = 20240611
COUNTS = {"json": 400, "hdf5": 250, "lies": 350}
CASE_SECONDS = 5


def build_corpus(root: Path) -> list[Case]:
    rng = random.Random(SEED)
    counter = iter(range(1000))

    def make_ckpt(model_type: str, **kw) -> Path:
        return write_random_checkpoint(root / f"ck{next(counter)}", tiny_config(model_type), **kw)

    families = {
        "json": JsonFamily(root / "json", make_ckpt),
        "hdf5": H5Family(root / "hdf5"),
        "lies": LieFamily(root / "lies"),
    }
    return [case for name, fam in families.items() for case in fam.cases(rng, COUNTS[name])]


def test_adversarial_corpus(tmp_path: Path, record_property) -> None:
    for sub in ("json", "hdf5", "lies"):
        (tmp_path / sub).mkdir()
    t0 = time.monotonic()
    cases = build_corpus(tmp_path)
    assert len(cases) >= 400
    outcomes: dict[str, Counter[str]] = {}
    bugs: list[str] = []
    slowest = (0.0, "")
    for case in cases:
        start = time.monotonic()
        try:
            with deadline(CASE_SECONDS, case.name):
                outcome = case.run()
        except TolcliError as e:
            outcome = type(e).__name__
            if "\n" in str(e) or len(str(e)) > 1500:
                bugs.append(f"{case.name}: a message of {len(str(e))} chars / several lines: {str(e)[:200]!r}")
        except WrongAnswer as e:
            outcome = "WRONG ANSWER"
            bugs.append(f"{case.name}: {e}")
        except Hang as e:
            outcome = "HANG"
            bugs.append(f"{case.name}: {e}")
        except Exception as e:  # anything else is an internal error: a bug
            outcome = "INTERNAL ERROR"
            bugs.append(f"{case.name}: {type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc(limit=-4)[-800:]}")
        slowest = max(slowest, (time.monotonic() - start, case.name))
        outcomes.setdefault(case.family, Counter())[outcome] += 1
    total = Counter()
    for c in outcomes.values():
        total.update(c)
    summary = {fam: dict(sorted(c.items())) for fam, c in outcomes.items()}
    summary["all"] = dict(sorted(total.items()))
    record_property("adversarial_counts", summary)
    print(f"\nadversarial corpus: {len(cases)} cases in {time.monotonic() - t0:.1f} s (slowest {slowest[0]:.2f} s)")
    for fam, c in summary.items():
        print(f"  {fam:5}: {sum(c.values()):4} cases  {c}")
    assert not bugs, f"{len(bugs)} bad outcomes:\n" + "\n".join(b[:1500] for b in bugs[:20])
    assert sum(total.values()) == len(cases) >= 400
    for fam, c in outcomes.items():  # every family exercises both refusals and good reads
        assert c["ok"] > 0 and sum(n for o, n in c.items() if not o.startswith("ok")) > 0, (fam, c)
