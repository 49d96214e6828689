"""A busy machine is noticed: latency-aware pruning refuses to call a target reached, a profile marks every
figure unreliable and fails its gates, unless the user proceeds with --allow-busy (recorded). The load is
a fake load source, and a real competing process for the spread of the rounds."""

from __future__ import annotations

import json

import pytest

from profilers import quiet

REAL_OTHERS_SHARE = quiet.others_share  # taken at import, before conftest pins it for every test


@pytest.fixture
def busy(monkeypatch):
    monkeypatch.setattr(quiet, "others_share", lambda since, now: 0.85)


def test_our_own_threads_do_not_count_as_a_busy_machine():
    """The share is other processes' CPU time: busy jiffies that were this process's own do not count."""
    assert REAL_OTHERS_SHARE((1000, 200, 4000), (1150, 350, 4200)) == 0.0  # all 150 busy jiffies were ours
    assert REAL_OTHERS_SHARE((1000, 200, 4000), (1150, 250, 4200)) == 0.5  # 100 of 200 went to others
    sample = quiet.cpu_times()
    assert sample is None or (len(sample) == 3 and sample[0] <= sample[2])


def test_the_three_signs():
    m = quiet.MachineCheck(cpus=2)
    m.rounds("the parent", [1.0, 1.1, 1.0, 1.05, 9.0])  # one stray round is trimmed
    m.drift("the parent", 3.8, 4.1)
    assert m.quiet
    m.rounds("the parent", [1.0, 3.0, 1.1, 2.9, 3.2])
    m.drift("the parent", 3.78, 23.04)
    assert not m.quiet and len(m.reasons) == 2 and "23" in m.summary()


def test_latency_aware_prune_on_a_busy_machine_is_refused_or_flagged(cli, cnn_parent, tmp_path, busy):
    out = tmp_path / "fast"
    args = ["prune", "--model", cnn_parent, "--target-speedup", "1.2", "--latency-batch", "4", "--latency-cache",
            tmp_path / "cache", "--latency-rounds", "3", "--latency-iterations", "1", "--threads", "1", "--no-depth",
            "--out", out, "-q"]
    _, _, err = cli(*args, expect=2)
    assert "machine was busy while measuring (other processes used 85% of the machine's CPU time before timing" in err
    assert "--allow-busy" in err and not out.exists()


@pytest.mark.slow  # a whole latency-aware prune; the flag's recording is also checked by the profile test below
def test_latency_aware_prune_on_a_busy_machine_with_allow_busy_is_flagged(cli, cnn_parent, tmp_path, busy):
    out = tmp_path / "fast"
    args = ["prune", "--model", cnn_parent, "--target-speedup", "1.2", "--latency-batch", "4", "--latency-cache",
            tmp_path / "cache", "--latency-rounds", "3", "--latency-iterations", "1", "--threads", "1", "--no-depth",
            "--out", out, "-q"]
    code, text, err = cli(*args, "--allow-busy", expect=None)
    if code == 2:  # proceeding does not make an unreachable target reached
        assert "not reached" in err and not out.exists()
        return
    assert code == 0 and "UNRELIABLE" in text
    rec = json.loads((out / "model.json").read_text())
    machine = rec["metrics"]["latency"]["machine"]
    assert machine["quiet"] is False and machine["allow_busy"] is True and machine["reasons"]
    assert rec["lineage"][-1]["settings"]["allow_busy"] is True


def test_a_profile_on_a_busy_machine_is_marked_and_its_gates_fail(cli, cnn_parent, tmp_path, busy):
    args = ["profile", cnn_parent, "--baseline", cnn_parent, "--backend", "torch", "--batch-sizes", "1", "--rounds", "2",
            "--no-energy", "--out", tmp_path / "p", "--max-latency-ms", "10000"]
    _, _, err = cli(*args, expect=1)
    assert "UNRELIABLE measurement" in err and "gates' numbers are unreliable" in err
    doc = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert doc["machine_check"]["quiet"] is False and "other processes used 85%" in doc["machine_check"]["reasons"][0]
    assert "**UNRELIABLE" in (tmp_path / "p" / "profile.md").read_text()
    cli(*args, "--allow-busy", "--overwrite", expect=0)
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["machine_check"]["allow_busy"] is True


def test_a_quiet_profile_says_so(cli, cnn_parent, tmp_path):
    cli("profile", cnn_parent, "--backend", "torch", "--batch-sizes", "1", "--rounds", "2", "--no-energy", "--json", tmp_path / "p.json")
    check = json.loads((tmp_path / "p.json").read_text())["machine_check"]
    assert check["quiet"] is True and check["cpu_load"] == {"before": 0.0, "after": 0.0}


def test_a_runtime_that_switches_speed_by_itself_gets_the_threads_hint():
    """Only the timings were unsteady (no other process): the refusal says `threads` 1 runs one steady speed;
    with another process busy, it does not."""
    from compressor.errors import UserError
    from orchestration.latency_prune import LatencyTarget, _refuse_if_busy
    from profilers.quiet import MachineCheck

    alone = MachineCheck()
    alone.rounds("the parent", [0.2, 0.21, 0.2, 0.42, 0.41, 0.4, 0.2])
    with pytest.raises(UserError, match="with `threads` 1 it runs one steady speed"):
        _refuse_if_busy(alone, LatencyTarget(2.0))
    crowded = MachineCheck()
    crowded._add("other processes used 85% of the machine's CPU time before timing")
    crowded.rounds("the parent", [0.2, 0.21, 0.2, 0.42, 0.41, 0.4, 0.2])
    with pytest.raises(UserError) as e:
        _refuse_if_busy(crowded, LatencyTarget(2.0))
    assert "threads" not in str(e.value)
