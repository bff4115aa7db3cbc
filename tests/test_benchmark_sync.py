"""``batchnorm bench --sync --quick``: a smoke run (no assertion on time)."""

from __future__ import annotations

import json

from batchnorm.__main__ import main
from batchnorm.functional._synchronized import communicated_bytes


def test_bench_sync_quick_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "sync.json"
    assert main(["bench", "--sync", "--quick", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 gloo processes" in out and "overhead ms" in out
    report = json.loads(path.read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    for case in report["cases"].values():
        assert set(case["ms_per_step"]) == {"unsynchronized", "synchronized", "collectives only"}
        assert case["bytes_per_step"] == communicated_bytes(case["channels"], 1, 2)


def test_communicated_bytes_counts_the_packed_tensors():
    # forward: a 5-number header + (count, mean, M2) per channel, float64; backward: 2 sums per
    # channel + the 2-number call check.
    assert communicated_bytes(64) == {
        "forward_sent": (5 + 3 * 64) * 8,
        "forward_received": (5 + 3 * 64) * 8,
        "backward_all_reduce": (2 * 64 + 2) * 8,
    }
    assert communicated_bytes(4, ghost_batches=2, world_size=3, first_call=True) == {
        "forward_sent": (5 + 3 * 8) * 8 + 40,
        "forward_received": 2 * ((5 + 3 * 8) * 8 + 40),
        "backward_all_reduce": (2 * 8 + 2) * 8,
    }
