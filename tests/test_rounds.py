"""Interleaved timing (wfcore/rounds.py, bench.time_rows) with a fake timer: no real timing."""

from __future__ import annotations

import itertools
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from wfcore.export import bench

from wfcore import rounds


class FakeClock:
    """A clock that advances only when a fake engine runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rotation_puts_each_candidate_first_once_and_in_each_place():
    orders = [rounds.rotation(4, r) for r in range(4)]
    assert orders[0] == [0, 1, 2, 3] and orders[1] == [1, 2, 3, 0]
    for place in range(4):
        assert sorted(order[place] for order in orders) == [0, 1, 2, 3]
    assert rounds.rotation(3, 7) == rounds.rotation(3, 1)


def test_every_round_times_every_candidate_once_in_rotated_order():
    calls: list[str] = []

    def timer(name: str, value: float):
        def slot() -> float:
            calls.append(name)
            return value
        return slot

    values = rounds.interleave({"a": timer("a", 1.0), "b": timer("b", 2.0),
                                "c": timer("c", 3.0)}, runs=4, clock=FakeClock())
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert values == {"a": [1.0] * 4, "b": [2.0] * 4, "c": [3.0] * 4}


def test_rounds_go_on_for_min_seconds_and_stop_at_max_seconds():
    clock = FakeClock()

    def slot() -> float:
        clock.now += 1.0
        return 1.0

    # 2 candidates, 2 s a round: 3 rounds (MIN_ROUNDS) would take 6 s; min_seconds asks 9
    assert len(rounds.interleave({"a": slot, "b": slot}, runs=1, min_seconds=9,
                                 clock=clock)["a"]) == 5
    clock.now = 0.0
    # runs=50 but max_seconds=7: stops after the round that passes 7 s (never before 3)
    assert len(rounds.interleave({"a": slot, "b": slot}, runs=50, max_seconds=7,
                                 clock=clock)["a"]) == 4
    clock.now = 0.0
    assert len(rounds.interleave({"a": slot, "b": slot}, runs=50, max_seconds=0.5,
                                 clock=clock)["a"]) == rounds.MIN_ROUNDS


def test_a_dropped_candidate_leaves_the_others_aligned():
    count = itertools.count()

    def dies() -> float:
        if next(count) == 2:
            raise rounds.Dropped("deepsparse on m.onnx: the process ended (killed by SIGABRT)")
        return 1.0

    values = rounds.interleave({"a": lambda: 2.0, "dies": dies}, runs=5, clock=FakeClock())
    assert list(values) == ["a"] and values["a"] == [2.0] * 5


def test_a_change_of_load_cancels_in_per_round_ratios_and_marks_the_run_noisy():
    # the machine's load doubles half-way: both candidates slow down alike
    load = [1.0] * 5 + [2.0] * 5
    dense = [0.030 * f for f in load]
    sparse = [0.010 * f for f in load]
    ratio = rounds.Ratio.of(dense, sparse)
    assert ratio.median == pytest.approx(3.0) and ratio.low == pytest.approx(3.0)
    assert ratio.high == pytest.approx(3.0) and ratio.rounds == 10
    # one after the other (dense timed in the loaded half only) would have said 6x
    assert sum(dense[5:]) / sum(sparse[:5]) == pytest.approx(6.0)
    assert rounds.noisy(dense) and rounds.spread(dense) == pytest.approx(1.0 / 1.5)
    quiet = [0.030, 0.031, 0.030, 0.0302, 0.0299]
    assert not rounds.noisy(quiet) and rounds.spread(quiet) < rounds.NOISE_BOUND
    assert not rounds.noisy([0.03, 0.03, 0.5, 0.03, 0.03])  # one odd round is not a trend


def test_ratios_need_the_same_rounds():
    with pytest.raises(ValueError, match="same rounds"):
        rounds.Ratio.of([1.0, 2.0], [1.0])


# -- bench.time_rows with fake engines ---------------------------------------------------
def tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


class FakeEngine:
    """An engine whose batch takes ``base`` seconds times the machine's load, which the
    shared ``machine`` changes as slots run (a burner starting half-way)."""

    def __init__(self, base: float, machine: dict) -> None:
        self.base, self.machine, self.closed = base, machine, False

    def time(self, repeats: int = 1) -> float:
        self.machine["slots"] += 1
        loaded = self.machine["slots"] > self.machine["burner_after"]
        return self.base * (3.0 if loaded else 1.0)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_engines(monkeypatch, tmp_path):
    machine = {"slots": 0, "burner_after": 10**9}
    speeds = {"dense.onnx/onnxruntime": 0.030, "dense.onnx/deepsparse": 0.006,
              "sparse.onnx/onnxruntime": 0.030, "sparse.onnx/deepsparse": 0.010}
    built: list[FakeEngine] = []

    def start(row, shape, threads, seed, isolate):
        built.append(FakeEngine(speeds[f"{row.path.name}/{row.engine}"], machine))
        return built[-1]

    monkeypatch.setattr(bench, "_start", start)
    paths = {n: tiny_onnx(tmp_path / n) for n in ("dense.onnx", "sparse.onnx")}
    return machine, built, paths


def test_bench_reports_per_round_ratios_and_marks_the_burner(fake_engines, monkeypatch):
    machine, built, paths = fake_engines
    machine["burner_after"] = 2 * 4 + 4 * 5  # 4 rows warmed up and calibrated, 5 quiet rounds
    monkeypatch.setattr(bench, "installed", lambda engine: engine != "torch")
    timings = bench.bench(paths["sparse.onnx"], dense=paths["dense.onnx"], batch_size=2,
                          engines=["deepsparse", "onnxruntime"], warmup=1, runs=12,
                          min_seconds=0)
    assert all(engine.closed for engine in built) and len(built) == 4
    by = {(Path(t.model).name, t.engine): t for t in timings}
    assert by[("sparse.onnx", "deepsparse")].speedup == pytest.approx(3.0)
    assert by[("sparse.onnx", "onnxruntime")].speedup == pytest.approx(1.0)
    assert all(t.runs == 12 and t.noisy for t in timings)
    assert by[("dense.onnx", "onnxruntime")].spread > rounds.NOISE_BOUND
    table = bench.format_table(timings)
    assert table.count(" noisy") >= 4 and "beyond 10%" in table
    # every row is considered, the dense model's too: dense on DeepSparse is fastest here
    line = bench.summary(timings, paths["dense.onnx"])
    assert line.startswith("fastest: dense.onnx on deepsparse, 5.00x")
    assert "median of 12 rounds" in line and "noisy" in line
    record = timings[0].as_dict()
    assert {"noisy", "speedup_low", "speedup_high", "round_ms", "spread"} <= set(record)


def test_a_quiet_run_is_not_noisy(fake_engines, monkeypatch):
    machine, built, paths = fake_engines
    monkeypatch.setattr(bench, "installed", lambda engine: engine != "torch")
    timings = bench.bench(paths["sparse.onnx"], dense=paths["dense.onnx"], batch_size=2,
                          engines=["onnxruntime"], warmup=0, runs=5, min_seconds=0)
    assert not any(t.noisy for t in timings) and "noisy" not in bench.format_table(timings)
