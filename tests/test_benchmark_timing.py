"""The timing helper the benchmarks share (benchmarks/timing.py): turns and medians."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from timing import interleaved_medians  # noqa: E402


def test_interleaved_medians_rotates_which_function_runs_first_and_takes_each_ones_median():
    calls = []
    now = [0.0]
    durations = {"a": iter([1, 9, 2, 8, 3]), "b": iter([5, 5, 4, 6, 7])}

    def timed(name):
        def function():
            calls.append(name)
            now[0] += next(durations[name]) if len(calls) > 2 else 0.0  # the two warm-up calls take no time
        return function

    medians = interleaved_medians([timed("a"), timed("b")], repeats=4, warmup=1, clock=lambda: now[0])
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    # the timed calls of "a" lasted 1, 9, 2, 8 and those of "b" 5, 5, 4, 6
    assert medians == [5.0, 5.0]
