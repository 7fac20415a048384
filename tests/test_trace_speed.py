"""Tests of the tracing benchmark's bookkeeping (benchmarks/trace_speed.py), not of its timings."""

from __future__ import annotations

import trace_speed

MIB = 2**20


def measurement(start_mib: int, peak_mib: int, **extra) -> dict:
    return {"median": 1.0, "rss_at_start": start_mib * MIB, "peak_rss": peak_mib * MIB, "peak_is_own": True, **extra}


def test_memory_row_checks_bound():
    kinds = {
        "roofline_forward": measurement(500, 600),
        "trace": measurement(510, 700, chunk_bytes=48 * MIB, gram_bytes=41 * MIB),
        "peer": {"skipped": "its lens would hold 15.9 GiB at once"},
    }

    row = trace_speed.render_memory_row("probes", kinds)

    # bound = 510 at start + 100 forward rise + 96 for two chunks; with the Gram sums 747
    assert row == "| probes | 510 | 100 | 96 | 706 | 41 | 700 | yes (6 below) | yes (47 below) | its lens would hold 15.9 GiB at once |"
    kinds["trace"]["peak_rss"] = 730 * MIB
    assert "| no (24 above) | yes (17 below) |" in trace_speed.render_memory_row("probes", kinds)
    kinds["trace"]["peak_rss"] = 800 * MIB
    assert "| no (94 above) | no (53 above) |" in trace_speed.render_memory_row("probes", kinds)
    kinds["trace"]["peak_is_own"] = False
    assert "unknown: the peak could not be reset" in trace_speed.render_memory_row("probes", kinds)


def test_cut_to_tokens_exact():
    prompts = trace_speed.cut_to_tokens(((1, 2, 3), (4, 5)), 7)

    assert prompts == [[1, 2, 3], [4, 5], [1, 2]]
