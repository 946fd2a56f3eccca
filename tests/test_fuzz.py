"""The file readers under seeded fuzzing (`benchmarks/fuzz.py`): only the project's own errors, no hang, no crash
(issue 11, item 7). Each case runs in a worker process with a time limit and a memory limit."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.fuzz import READERS, Case, describe_failures, generate_cases, run_cases, tally

CASES = 320  # 80 per reader: .near, EXR, HDR, weights folder


@pytest.mark.timeout(600)
def test_fuzzed_files_give_only_project_errors(tmp_path):
    cases = generate_cases(CASES, seed=0, work=tmp_path)
    outcomes = run_cases(cases, workers=2, case_timeout=60)
    assert [o.case.index for o in outcomes] == list(range(CASES))
    assert describe_failures(outcomes) == []
    table = tally(outcomes)
    for reader in READERS:  # the mutations reach the readers' checks, and some leave files that still read
        assert table[reader]["error"] >= 10, (reader, table[reader])
    assert table["all"]["ok"] >= 10, table["all"]


def test_the_runner_blames_the_case_that_crashed_hung_or_failed(tmp_path):
    from near_engine.asset import Asset, write_asset

    good = tmp_path / "good.near"
    write_asset(good, Asset(np.zeros((1, 3), np.int32), np.zeros((1, 8), np.float32)))
    readers = ["near", "selftest-crash", "near", "selftest-hang", "selftest-bug", "near"]
    cases = [Case(i, r, str(good), r) for i, r in enumerate(readers)]
    outcomes = run_cases(cases, workers=1, case_timeout=5)
    assert [o.result for o in outcomes] == ["ok", "crash", "ok", "hang", "traceback", "ok"]
    assert "SIGABRT" in outcomes[1].detail and "KeyError" in outcomes[4].detail
