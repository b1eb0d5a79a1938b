"""bench/speed/whole_job.py's table: medians, ranges and ratios from its records, newest commit only."""

from __future__ import annotations

import json

from bench.speed.whole_job import summary_rows

PHASES = {"load": 1.0, "salience": 0.0, "selection": 0.0, "training": 10.0, "eval": 2.0, "save": 0.5}


def _record(method, job_s, peaks, commit="b" * 40, load=0.2):
    return {"method": method, "commit": commit, "load_before": load, "job_s": job_s,
            "phase_s": {**PHASES, "training": job_s - 3.5}, "peak_rss_mib_per_rank": peaks, "load_after": 1.0}


def test_medians_ranges_and_ratios_to_the_first_method(tmp_path):
    path = tmp_path / "whole_job.jsonl"
    records = [_record("speft", 100, [900, 1000]), _record("lora", 50, [800, 700]), _record("speft", 120, [950, 990]),
               _record("lora", 60, [820, 710]), _record("speft", 110, [990, 980], load=0.4), _record("lora", 70, [830, 700]),
               _record("speft", 999, [1, 1], commit="a" * 40)]  # an older commit's job: left out
    path.write_text("".join(json.dumps(r) + "\n" for r in [records[-1], *records[:-1]]))
    rows = summary_rows(path)
    assert rows[0].startswith("Commit bbbbbbb; each job started at a 1-minute load average of at most 0.40")
    speft = next(r for r in rows if r.startswith("| speft |")).split(" | ")
    lora = next(r for r in rows if r.startswith("| lora |")).split(" | ")
    assert speft[1:3] == ["3", "110 (100-120)"] and speft[-2] == "990 (990-1,000)"
    assert lora[1:3] == ["3", "60 (50-70)"] and lora[-1] == "0.55 (0.45-0.64) |"
    assert speft[-1] == "1.00 (0.91-1.09) |"


def test_no_records_no_table(tmp_path):
    assert summary_rows(tmp_path / "missing.jsonl") == []
