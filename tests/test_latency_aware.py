"""Latency-aware pruning: the width solver on synthetic latency tables, the on-disk table cache, and one
end-to-end prune with a real (tiny) measured table. Measurement-heavy checks live in bench/latency_aware.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from compressor.errors import UserError
from compressor.latency_plan import Group, Layer, ladder, plan_widths, predict, removal_indices


def _chain(n_groups=3, width=64):
    """conv0 (3 -> g0) -> conv1 (g0 -> g1) -> ... -> linear head (g_last -> 10)."""
    rng = np.random.default_rng(0)
    groups = [Group(f"g{i}", width, rng.random(width) + 0.5) for i in range(n_groups)]
    layers = [Layer("conv0", "conv", None, "g0", in_fixed=3)]
    layers += [Layer(f"conv{i}", "conv", f"g{i - 1}", f"g{i}") for i in range(1, n_groups)]
    layers.append(Layer("head", "linear", f"g{n_groups - 1}", None, out_fixed=10))
    return groups, layers


def test_widths_the_hardware_dislikes_are_avoided():
    """Widths that are not a multiple of 16 cost twice as much: every chosen width is a multiple of 16,
    although the ladder offers every width."""
    def cost(sig, c_in, c_out):
        base = 1e-3 * c_in * c_out
        return base * (2.0 if (c_in % 16 or c_out % 16) else 1.0)

    groups, layers = _chain()
    for g in groups:
        g.ladder = list(range(1, g.n + 1))
    parent = predict(layers, {g.name: g.n for g in groups}, cost, 0.1)
    plan = plan_widths(groups, layers, cost, parent / 2, offset_ms=0.1)
    assert plan.predicted_ms <= parent / 2
    assert all(w % 16 == 0 for w in plan.widths.values()), plan.widths
    assert plan.predicted_speedup >= 2


def test_least_important_group_goes_first():
    """With equal costs, the group whose units matter least loses the most."""
    def cost(sig, c_in, c_out):
        return 1e-3 * c_in * c_out

    groups, layers = _chain(n_groups=2, width=32)
    groups[0].scores[:] = 10.0
    groups[1].scores[:] = 0.1
    groups[0].sorted_scores = np.sort(groups[0].scores)
    groups[1].sorted_scores = np.sort(groups[1].scores)
    parent = predict(layers, {g.name: g.n for g in groups}, cost, 0.0)
    plan = plan_widths(groups, layers, cost, 0.7 * parent)
    assert plan.widths["g1"] < plan.widths["g0"]


def test_unreachable_budget_is_refused_in_one_line():
    def cost(sig, c_in, c_out):
        return 1.0  # nothing gets faster with fewer channels

    groups, layers = _chain()
    with pytest.raises(UserError, match="cannot be reached"):
        plan_widths(groups, layers, cost, 0.5)


def test_removal_takes_the_least_important_units():
    g = Group("g", 6, [5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    assert removal_indices(g, 3) == [1, 3, 5]
    assert removal_indices(g, 6) == []


def test_ladder_includes_multiples_of_8_and_respects_round_to():
    assert ladder(64, 16) == [16, 32, 48, 64]
    lad = ladder(100)
    assert lad[-1] == 100 and {8, 16, 96} <= set(lad) and lad == sorted(lad)


# ----------------------------------------------------------------------------- the measured table and its cache
def test_cache_hit_miss_and_fingerprint(tmp_path, monkeypatch):
    from profilers import layer_latency as ll

    calls = []

    class FakeTimer:
        node_timed = False  # a wall-clock timer (torch, TensorRT): the per-call cost comes off

        def op(self, op, batch, c_in, c_out, min_time_s):
            calls.append((c_in, c_out))
            return 1.0 + c_in * c_out / 100.0

        def overhead(self, shape, min_time_s):
            return 0.5

    monkeypatch.setattr(ll, "_OrtTimer", lambda threads: FakeTimer())
    op = ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), True)
    t = ll.LayerLatency("onnxruntime", "cpu", 1, None, tmp_path)
    key = t.register(op)
    assert t(key, 4, 8) == pytest.approx(0.5 + 0.32)  # overhead subtracted
    t(key, 4, 8)
    assert (t.measured, t.hits, len(calls)) == (1, 1, 1)
    t.save()
    again = ll.LayerLatency("onnxruntime", "cpu", 1, None, tmp_path)
    again.register(op)
    again(key, 4, 8)
    assert len(calls) == 1 and again.hits == 1  # read from disk
    doc = json.loads(t.path.read_text())
    assert doc["fingerprint"]["backend"] == "onnxruntime" and doc["fingerprint"]["batch"] == 1
    monkeypatch.setattr(ll, "fingerprint", lambda *a: {"cpu": "another machine"})
    other = ll.LayerLatency("onnxruntime", "cpu", 1, None, tmp_path)
    other.register(op)
    other(key, 4, 8)
    assert len(calls) == 2  # a different machine never reads this machine's numbers
    batch8 = ll.LayerLatency("onnxruntime", "cpu", 8, None, tmp_path)
    assert batch8.path != t.path
    FakeTimer.node_timed = True  # the runtime's own node times carry no per-call cost
    profiled = ll.LayerLatency("onnxruntime", "cpu", 2, None, None)
    assert profiled(profiled.register(op), 4, 8) == pytest.approx(1.32)


def _fake_ort_table(monkeypatch, cost):
    """An ONNX Runtime table whose timer answers `cost(c_in, c_out)` and counts its calls."""
    from profilers import layer_latency as ll

    calls = []

    class FakeTimer:
        node_timed = True

        def op(self, op, batch, c_in, c_out, min_time_s):
            calls.append((c_in, c_out))
            return cost(c_in, c_out)

    assert ll.LayerLatency("onnxruntime", "cpu", 1).gridded and not ll.LayerLatency("torch", "cpu", 1).gridded
    monkeypatch.setattr(ll, "_OrtTimer", lambda threads: FakeTimer())
    return ll.LayerLatency("onnxruntime", "cpu", 1, None, None), ll, calls


def test_grid_fit_answers_every_width_from_a_few_measured(monkeypatch):
    """On ONNX Runtime each signature is measured on a 6x6 grid of the widths it can take (one by one) and
    every width is answered from the fitted cost form: a runtime whose cost is that form is answered
    exactly between grid points, and no lookup measures anything more."""
    def true(ci, co):
        return 0.004 + 2e-5 * ci + 1e-5 * co + 3e-6 * ci * co

    t, ll, calls = _fake_ort_table(monkeypatch, true)
    conv = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), True))
    dw = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), True, (8, 8), False))
    stem = t.register(ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (32, 32), False))
    widths = list(range(8, 257, 8))
    t.use_grid({conv: (widths, widths, False), dw: (widths, widths, True), stem: ([3], widths, False)})
    assert len(calls) == t.measured == 36 + 6 + 6
    for ci, co in [(8, 8), (40, 200), (136, 72), (256, 256)]:
        assert t(conv, ci, co) == pytest.approx(true(ci, co), rel=1e-6)
    assert t(stem, 3, 104) == pytest.approx(true(3, 104), rel=1e-6)
    assert t(dw, 8, 8) < t(dw, 120, 120) < t(dw, 256, 256)
    assert len(calls) == 48  # every answer came from the fit


def test_one_noisy_entry_does_not_price_a_width(monkeypatch):
    """The winner's curse: a small layer's single entry is mostly the profiler's floor plus noise, and a
    planner reading single entries picks the ones that came out low. One grid entry timed 50 % low moves
    the fitted answer at its width by a few percent, not 50 %."""
    def true(ci, co):
        return 0.01 + 1e-6 * ci * co

    def timed(ci, co):
        return true(ci, co) * (0.5 if (ci, co) == (104, 104) else 1.0)

    t, ll, _ = _fake_ort_table(monkeypatch, timed)
    conv = t.register(ll.OpShape("conv", (1, 1), (1, 1), (0, 0), (1, 1), False, (1, 1), False))
    widths = list(range(8, 257, 8))
    t.use_grid({conv: (widths, widths, False)})
    assert (104, 104) in [(x, y) for x in t.grids[conv][0] for y in t.grids[conv][1]]
    assert t.entries[f"{conv}|104|104"] == pytest.approx(0.5 * true(104, 104))
    assert t(conv, 104, 104) == pytest.approx(true(104, 104), rel=0.1)


def test_ort_profile_per_run_leaves_out_reorders():
    from profilers.layer_latency import _kernel_ms_per_run

    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 90}, node(1, 10, "ReorderInput"),
              node(12, 40, "Conv"), node(53, 9, "ReorderOutput"), {"cat": "Node", "name": "n60_fence_after", "ts": 60, "dur": 3},
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 90}, node(101, 11, "ReorderInput"),
              node(113, 42, "Conv"), node(156, 4, "Relu")]
    assert _kernel_ms_per_run(events)[:, 0].tolist() == pytest.approx([0.040, 0.046])
    events.append(node(170, 20, "Conv") | {"name": "ref_y_nchwc_kernel_time"})
    assert _kernel_ms_per_run(events, "ref_").ravel().tolist() == pytest.approx([0.040, 0.0, 0.046, 0.020])


def test_ort_entries_scaled_to_the_reference_timed_beside_them(monkeypatch):
    """A layer timed while the machine ran at half speed costs what it costs at the table's speed: each
    entry is its time relative to the reference conv in the same runs, times the reference's first time."""
    from profilers import layer_latency as ll

    speed = iter([1.0, 2.0])  # the second entry is timed on a machine twice as slow

    def fake_runs(model, threads, min_time_s, max_runs=500, batch=1, reference=None):
        s = next(speed)
        return np.array([[0.10 * s, 0.05 * s]] * 9)

    monkeypatch.setattr(ll, "_ort_profile_runs", fake_runs)
    timer = ll._OrtTimer(1)
    op = ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (8, 8), False)
    assert timer.op(op, 1, 8, 8, 0.01) == pytest.approx(0.10)
    assert timer.op(op, 1, 8, 8, 0.01) == pytest.approx(0.10) and timer.reference_ms == pytest.approx(0.05)


def test_ort_node_time_below_wall_clock():
    """A conv's kernel time from ONNX Runtime's profiler is what it costs inside a network: less than the
    wall clock around a one-conv session, which pays for the call and the NCHWc reorders at its ends."""
    from profilers import layer_latency as ll

    op = ll.OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), False)
    timer = ll._OrtTimer(1)
    graph = lambda: ll._op_nodes(op, 16, 16)  # noqa: E731
    inside = timer.op(op, 1, 16, 16, 0.05)
    wall = ll._time(timer._session(graph, (1, 16, 16, 16)), (1, 16, 16, 16), 0.05)
    assert 0 < inside < wall


def test_ladder_keeps_to_the_runtimes_fast_widths():
    assert ladder(16, min_fraction=0.2, align=(4, 8)) == [8, 12, 16]  # not 4..7 nor 9, 10, 11, 13, 14, 15
    assert ladder(6, align=(4, 8)) == list(range(1, 7))  # a group narrower than the block is left alone
    assert all(w % 4 == 0 for w in ladder(100, align=(4, 8))[:-1]) and ladder(100, align=(4, 8))[-1] == 100


def test_real_onnxruntime_entry_grows_with_width():
    from profilers.layer_latency import LayerLatency, OpShape

    t = LayerLatency("onnxruntime", "cpu", 8, 1, None, min_time_s=0.05)
    key = t.register(OpShape("conv", (3, 3), (1, 1), (1, 1), (1, 1), False, (16, 16), True))
    small, big = t(key, 4, 4), t(key, 64, 64)
    assert 0 <= small < big


@pytest.mark.skipif(os.environ.get("COMPRESS_SLOW_TESTS") != "1",
                    reason="opt-in (COMPRESS_SLOW_TESTS=1): the default suite runs this path inside "
                           "test_compare_at_matched_measured_speedup; bench/latency_aware.py measures it on real models")
def test_end_to_end_latency_aware_prune(cli, cnn_parent, tmp_path):
    """A real measured table on this CPU; the command reports predicted and measured speedups and records
    them; the written child reloads. (Whether the target is met is the benchmark's business.)"""
    out = tmp_path / "fast"
    code, text, err = cli("prune", "--model", cnn_parent, "--metric", "taylor", "--calib-size", "64", "--target-speedup", "1.3",
                          "--latency-batch", "8", "--latency-cache", tmp_path / "cache", "--latency-rounds", "3",
                          "--latency-iterations", "1", "--threads", "1", "--out", out, "-q", expect=None)
    if code == 2:  # a target this machine cannot reach is refused in one line, nothing written
        assert ("cannot be reached" in err or "not reached" in err and "attempts measured" in err) and err.count("\n") == 1
        assert not out.exists()
        return
    assert code == 0, err
    assert "predicted" in text and "measured" in text
    rec = json.loads((out / "model.json").read_text())
    lat = rec["lineage"][-1]["metrics"]["latency"]
    assert lat["predicted_speedup"] >= 1.3 and lat["measured_parent_ms"] > 0 and len(lat["speedup_ci"]) == 2
    assert list((tmp_path / "cache").glob("latency-onnxruntime-cpu-b8-*.json"))
    # depth is on: every removable block was timed and scored (Taylor), and what was removed is recorded
    assert rec["lineage"][-1]["settings"]["depth"] is True and lat["blocks"] and "block_factor" in lat["calibration"]
    assert rec["removed_blocks"] == lat["removed_blocks"]
    cli("info", out)


@pytest.mark.parametrize("args,words", [
    (["--target-speedup", "0.5"], "above 1"),
    (["--target-speedup", "2", "--target-latency-ms", "3"], "one of"),
    (["--target-speedup", "2", "--latency-backend", "tvm"], "--latency-backend"),
    (["--target-speedup", "2", "--latency-batch", "0"], "--latency-batch"),
    (["--target-speedup", "2", "layers", "--num-blocks", "1"], "goes after `prune layers`"),
])
def test_bad_latency_options_are_refused_before_any_work(cli, cnn_parent, tmp_path, args, words):
    out = tmp_path / "x"
    _, _, err = cli("prune", "--model", cnn_parent, *args, "--out", out, expect=2)
    assert words in err and not out.exists()


def test_ladder_floor_and_best_effort_plan():
    assert ladder(16, min_fraction=0.2) == list(range(4, 17))
    assert ladder(64, 16, min_fraction=0.3) == [32, 48, 64]

    def cost(sig, c_in, c_out):
        return 1e-3 * c_in * c_out

    groups, layers = _chain(width=32)
    for g in groups:
        g.ladder = ladder(32, min_fraction=0.5)
    plan = plan_widths(groups, layers, cost, 0.0, best_effort=True)  # out of reach: the fastest allowed plan
    assert all(w == 16 for w in plan.widths.values()) and plan.exhausted
    reachable = plan_widths(groups, layers, cost, 0.9 * plan.parent_ms, best_effort=True)
    assert not reachable.exhausted and reachable.predicted_ms <= 0.9 * plan.parent_ms


def test_vit_heads_and_ffn_cut_by_width_equal_masking_them():
    """A ViT's heads and FFN neurons removed by the latency-aware surgery give the outputs of the unpruned
    model with exactly those units zeroed at their consumers, and timm's num_heads follows."""
    import torch

    from compressor.data import InputSpec
    from compressor.models import _vit_cifar, clone
    from compressor.pruning import attention_heads, channel_groups, prune_to_widths
    from compressor.structures import Masks

    torch.manual_seed(0)
    model = _vit_cifar(10, depth=2, embed_dim=48, num_heads=4, img_size=16).eval()
    spec = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)
    _, infos = channel_groups(model, spec)
    assert sorted(i.kind for i in infos) == ["ffn", "ffn", "head", "head"]  # the embedding width is out of scope
    remove = {i.name: ([0, 2] if i.kind == "head" else list(range(0, 96, 3))) for i in infos}
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), Masks() as masks:
        for i in infos:
            masks.set(i, [d for u in remove[i.name] for d in i.unit_dims(u)])
        want = model(x)
    child = clone(model)
    prune_to_widths(child, spec, remove)
    assert list(attention_heads(child).values()) == [2, 2]
    assert child.blocks[0].mlp.fc1.out_features == 64
    with torch.no_grad():
        assert torch.allclose(child(x), want, atol=1e-5)


def test_vit_latency_layers_include_attention_cores_in_heads():
    """The latency model of a ViT: qkv/proj widths in head units (3 x head_dim rows, head_dim columns),
    the attention core sized by the head count, the embedding width fixed."""
    from compressor.data import InputSpec
    from compressor.models import _vit_cifar
    from compressor.pruning import WidthConfig, unit_scores
    from orchestration.latency_prune import _layers
    from profilers.layer_latency import LayerLatency, op_shapes

    model = _vit_cifar(10, depth=1, embed_dim=48, num_heads=4, img_size=16).eval()
    spec = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)
    pruner, infos, scores = unit_scores(model, spec, WidthConfig())
    assert {len(scores[i.name]) for i in infos if i.kind == "head"} == {4}  # one score per head
    layers = {lay.name: lay for lay in _layers(model, pruner, infos, op_shapes(model, (3, 16, 16)),
                                               LayerLatency("onnxruntime", "cpu", 1))}
    heads = next(i.name for i in infos if i.kind == "head")
    w = {i.name: i.n_units for i in infos} | {heads: 3}
    assert layers["blocks.0.attn.qkv"].widths(w) == (48, 3 * 36)
    assert layers["blocks.0.attn.proj"].widths(w) == (36, 48)
    assert layers["blocks.0.attn:core"].widths(w) == (3, 3)
    assert layers["patch_embed.proj"].widths(w) == (3, 48)


def test_real_onnxruntime_attention_core_grows_with_heads():
    from profilers.layer_latency import LayerLatency, OpShape

    t = LayerLatency("onnxruntime", "cpu", 8, 1, None, min_time_s=0.05)
    key = t.register(OpShape("attention", kernel=(32,), spatial=(64,), bias=False))
    assert 0 <= t(key, 1, 1) < t(key, 12, 12)


@pytest.mark.slow  # bench/latency_aware.py --only vit_cifar and bench/depth_latency.py run it for real; the planner's ViT case is in test_depth_plan
def test_end_to_end_latency_aware_vit(cli, vit_parent, tmp_path):
    """Heads and FFN neurons of a timm ViT under a measured budget; the child reloads."""
    out = tmp_path / "vit"
    code, text, err = cli("prune", "--model", vit_parent, "--target-speedup", "1.2", "--latency-batch", "8",
                          "--latency-cache", tmp_path / "cache", "--latency-rounds", "3", "--latency-iterations", "1",
                          "--threads", "1", "--out", out, "-q", expect=None)
    if code == 2:
        assert "not reached" in err and err.count("\n") == 1 and not out.exists()
        return
    assert code == 0, err
    rec = json.loads((out / "model.json").read_text())
    widths = rec["lineage"][-1]["metrics"]["latency"]["widths"]
    assert any(".attn." in g for g in widths) and any(".mlp." in g for g in widths)
    assert any(after < before for before, after in widths.values())
    cli("info", out)


def test_the_attempt_kept_is_the_one_within_the_band_not_the_overshoot():
    from orchestration.latency_prune import better_attempt

    goal = 2.0  # speedups; the ratio is measured ms / goal ms = goal / speedup
    r = lambda speedup: goal / speedup  # noqa: E731
    assert better_attempt(r(1.9), r(2.61))  # 5 % short beats 30 % over
    assert not better_attempt(r(2.61), r(1.9))
    assert better_attempt(r(2.05), r(1.9))  # both in the band: the closer
    assert better_attempt(r(2.6), r(1.5))  # neither in the band: the one that reaches the goal
    assert not better_attempt(r(1.5), r(2.6))


def test_the_next_budget_stays_inside_the_bracket_and_is_never_planned_twice():
    """Attempts measured in a ResNet-20 batch-1 run for 2x (goal 0.3626 ms): a slow first child, then one too
    fast, then a looser budget that also came out too fast. The next budget lies between the loosest fast
    budget and the slow one; picking the pair closest in measured ms had planned 0.307 ms again, and the
    same budget is the same child (two attempts were spent measuring it twice)."""
    from orchestration.latency_prune import _next_budget

    goal = 0.3626
    t = lambda budget, ms: {"budget_ms": budget, "effective_ms": ms}  # noqa: E731
    tries = [t(0.3626, 0.4646), t(0.2830, 0.3185)]
    third = _next_budget(tries, goal)
    assert 0.2830 < third < 0.3626 and third == pytest.approx(0.2830 + (goal - 0.3185) / (0.4646 - 0.3185) * (0.3626 - 0.2830))
    tries.append(t(third, 0.3160))  # looser, and measured a hair faster: noise
    fourth = _next_budget(tries, goal)
    assert third < fourth < 0.3626
    # measurements out of budget order fall back to the closest on either side, and a repeat is bisected
    crossed = [t(0.30, 0.40), t(0.32, 0.33)]  # the tighter budget measured slow, the looser fast
    nxt = _next_budget(crossed, goal)
    assert nxt == pytest.approx(0.32 + (goal - 0.33) * (0.30 - 0.32) / (0.40 - 0.33))
    assert _next_budget([t(0.30, 0.40), t(0.32, goal)], goal) == pytest.approx(0.31)  # would repeat 0.32
    assert _next_budget([t(0.4, 0.5)], goal) == pytest.approx(0.4 * goal / 0.5)


def test_a_target_is_reached_within_ten_percent_of_what_was_asked():
    """A speedup target is judged on the speedup (1.81x is 9.5 % short of 2x: reached; it was refused when
    the limit was 1.1x the goal's milliseconds), a latency target on its milliseconds."""
    from orchestration.latency_prune import better_attempt, reached

    parent_ms, goal = 10.0, 2.0
    ms = lambda speedup: parent_ms / speedup  # noqa: E731
    assert reached(ms(1.81), ms(goal), True) and reached(ms(2.6), ms(goal), True)
    assert not reached(ms(1.79), ms(goal), True)
    assert reached(10.9, 10.0, False) and not reached(11.2, 10.0, False)
    # the loop's band and the refusal agree: what the loop keeps as in the band is never refused
    assert better_attempt(ms(1.81) / ms(goal), ms(1.7) / ms(goal)) and reached(ms(1.81), ms(goal), True)
