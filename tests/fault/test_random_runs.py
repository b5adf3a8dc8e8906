"""The CI subset of the randomized fault driver (issue 5, item 4): 20 seeded runs.

Each run is one seed of :func:`tests.fault.driver.generate` (profile "ci":
a 16-32 MiB device, two or three faults held 0.2-1 s each, five to ten
seconds a run); the seeds below are 1-18 plus two that bring the faults the
first eighteen do not draw, so that every kind of :data:`KINDS` and every
replication mode is exercised.  A run must end with 0 lost acknowledged
writes, 0 corrupt or divergent blocks, no stale read, no traceback and no
split-brain in the logs (:meth:`RunResult.verdict`).

A failure names the seed, the scenario, what went wrong and the command that
replays it; the failed run's logs, event timeline and journal are kept in
the test's tmp_path.  The counts of the whole subset are written to
``$PYHAST_FAULT_RESULTS`` (default: ``fault-results-ci.json`` in pytest's
base temporary directory) and printed.

The long target: ``make fault-long`` (200 runs of the "long" profile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.driver import KINDS, RunResult, aggregate, generate, replay_command, run_scenario

CI_SEEDS = [*range(1, 19), 23, 84]

pytestmark = pytest.mark.timeout(150)

_RESULTS: list[RunResult] = []


@pytest.fixture(scope="module", autouse=True)
def results_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if not _RESULTS:
        return
    default = tmp_path_factory.getbasetemp() / "fault-results-ci.json"
    path = Path(os.environ.get("PYHAST_FAULT_RESULTS") or default)
    doc = aggregate(_RESULTS, profile="ci", seeds=CI_SEEDS)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"\nfault driver, CI subset: {doc['runs']} runs, {doc['failed']} failed; "
        f"{doc['acknowledged_writes_checked']} acknowledged writes checked, "
        f"{doc['lost_acknowledged_writes']} lost, {doc['divergent_blocks']} divergent "
        f"blocks; faults {doc['faults_by_kind']}; results in {path}"
    )


def test_the_ci_seeds_draw_every_fault_and_mode() -> None:
    scenarios = [generate(seed, "ci") for seed in CI_SEEDS]
    kinds = {step.kind for sc in scenarios for step in sc.steps}
    assert kinds == set(KINDS), sorted(set(KINDS) - kinds)
    assert {sc.mode for sc in scenarios} == {"memsync", "fullsync", "async"}


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_random_fault_run(seed: int, tmp_path: Path) -> None:
    sc = generate(seed, "ci")
    result = run_scenario(sc, keep=tmp_path)
    _RESULTS.append(result)
    print(sc.describe())
    print(result.summary())
    if not result.ok:
        lines = [
            f"fault run failed: seed {seed}",
            sc.describe(),
            *result.verdict(),
            *(d.rstrip() for d in result.details[:10]),
            f"artifacts: {result.artifacts}",
            f"replay: {replay_command(seed)}",
        ]
        pytest.fail("\n".join(lines), pytrace=False)
    assert result.acked_checked > 0
