"""The gradient stage: the background writer and the column sums a disk store takes as it is
written (the same rows as a write in the caller's thread; errors and Ctrl-C leave no file),
per-sample gradients of attention models."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wfcore.errors import WfcoreError
from wfcore.fisher.gradients import GradientSampler
from wfcore.fisher.store import GradientStore
from wfcore.fisher.store_writer import StoreWriter
from wfcore.masks import Masks, select_params


def tiny_sampler(num_grads: int = 24) -> tuple[GradientSampler, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 3, 4, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (40,), generator=gen))
    params = select_params(model, None)
    keep = Masks(params).keep
    keep["1.weight"][0, :5] = False  # pruned coordinates: zero columns
    sampler = GradientSampler(model, params, keep, data, nn.CrossEntropyLoss(),
                              num_grads=num_grads, progress=False)
    sampler._chunk_rows = lambda: 5  # several chunks (and a short last one) through the queue
    return sampler, model


def store_files(directory) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".wfcore-gradients"))


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wfcore-store-writer"]


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_disk_rows_through_the_writer_equal_the_in_memory_rows_bit_for_bit(tmp_path, method):
    sampler, _ = tiny_sampler()
    sampler.method = method
    expected = sampler.sample()  # in memory: written in the caller's thread
    sampler.reset()
    with GradientStore(24, sampler.layout.d, place="disk", directory=tmp_path) as store:
        sampler.sample_into(store)
        assert torch.equal(store.tensor(), expected)
        # the column sums taken while writing: those of a float64 pass over the stored rows
        reference = expected.double().square().mean(0)
        torch.testing.assert_close(store.square_mean(), reference, rtol=1e-15, atol=0)
        assert float(store.square_mean()[0]) == 0.0  # a pruned weight's column
    assert not writer_threads()


def test_column_sums_need_every_row_once(tmp_path, monkeypatch):
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    with GradientStore(6, 9, place="disk", directory=tmp_path) as store:
        store.write(0, G[:4])
        store.write(2, G[2:6])  # rows 2-3 written twice: the sums would count them twice
        streamed = []
        real = store.column_reduce
        monkeypatch.setattr(store, "column_reduce",
                            lambda *a, **k: streamed.append(1) or real(*a, **k))
        torch.testing.assert_close(store.square_mean(), G.double().square().mean(0))
        assert streamed == [1]  # read back from the file, not from the sums


def test_an_error_in_the_writer_reaches_the_caller_and_leaves_no_file(tmp_path, monkeypatch):
    sampler, _ = tiny_sampler()
    written = []

    def failing_write(self, start, rows):
        if written:
            raise OSError(28, "No space left on device")
        written.append(start)

    monkeypatch.setattr(GradientStore, "write", failing_write)
    with pytest.raises(WfcoreError, match="^gradient store: writing rows failed: .*No space"):  # noqa: PT012
        with GradientStore(24, sampler.layout.d, place="disk", directory=tmp_path) as store:
            assert not store_files(tmp_path)  # nameless from the start
            sampler.sample_into(store)
    assert not store_files(tmp_path) and not writer_threads() and store._fd is None


def test_ctrl_c_while_rows_are_queued_stops_the_writer_and_leaves_no_file(tmp_path,
                                                                         monkeypatch):
    sampler, _ = tiny_sampler()
    release = threading.Event()
    real_write = GradientStore.write

    def slow_write(self, start, rows):
        release.wait(5)  # the queue fills up behind it
        real_write(self, start, rows)

    calls = []
    real_flat = GradientSampler._flat_rows

    def interrupted(self, grads):
        calls.append(1)
        if len(calls) == 4:
            release.set()
            raise KeyboardInterrupt
        return real_flat(self, grads)

    monkeypatch.setattr(GradientStore, "write", slow_write)
    monkeypatch.setattr(GradientSampler, "_flat_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):  # noqa: PT012
        with GradientStore(24, sampler.layout.d, place="disk", directory=tmp_path) as store:
            sampler.sample_into(store)
    assert not store_files(tmp_path) and not writer_threads()


def test_the_writer_waits_when_its_queue_is_full(tmp_path):
    order: list[str] = []
    gate = threading.Event()

    class Slow:
        def write(self, start, rows):
            gate.wait(5)
            order.append(f"wrote {start}")

    writer = StoreWriter(Slow(), depth=1)
    writer.write(0, torch.zeros(1, 2))  # taken by the thread, which waits at the gate
    writer.write(1, torch.zeros(1, 2))  # queued: the queue is full now
    blocked = threading.Thread(target=lambda: (writer.write(2, torch.zeros(1, 2)),
                                               order.append("queued 2")))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and order == []  # the third chunk waits for room
    gate.set()
    blocked.join(5)
    writer.close()
    assert [o for o in order if o.startswith("wrote")] == ["wrote 0", "wrote 1", "wrote 2"]


def test_attention_gets_batched_per_sample_gradients_without_the_slow_fallback():
    import warnings

    from wfcore.plugins.architectures import TinyViT

    torch.manual_seed(0)
    model = TinyViT((1, 14, 14), 4, 7, 16, 1, 2, 2)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 1, 14, 14, generator=gen),
                         torch.randint(0, 4, (12,), generator=gen))
    params = select_params(model, None)
    rows = {}
    for method in ("vmap", "loop"):
        sampler = GradientSampler(model, params, Masks(params).keep, data,
                                  nn.CrossEntropyLoss(), num_grads=6, progress=False,
                                  method=method)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows[method] = sampler.sample()
        assert sampler.method == method  # vmap did not fail over to the loop
        assert not [w for w in caught if "batching rule" in str(w.message)]
    torch.testing.assert_close(rows["vmap"], rows["loop"], rtol=1e-4, atol=1e-6)


# -- the per-sample method, calibrated ----------------------------------------------------
def test_calibration_keeps_the_sample_stream_and_records_its_choice():
    sampler, _ = tiny_sampler(num_grads=160)
    sampler.method = "auto"
    rows = sampler.sample()
    choice = sampler.choice
    assert choice.reason == "calibrated" and choice.method in ("vmap", "loop")
    assert set(choice.rows_per_s) >= {"loop"} and all(v > 0 for v in choice.rows_per_s.values())
    assert choice.record()["method"] == choice.method
    # the same samples as a sampler told the chosen method from the start
    fixed, _ = tiny_sampler(num_grads=160)
    fixed.method = choice.method
    fixed._chunk_rows = lambda: choice.chunk
    torch.testing.assert_close(rows, fixed.sample(), rtol=1e-6, atol=1e-7)


def test_calibration_falls_back_to_the_loop_when_vmap_cannot_trace(monkeypatch):
    sampler, _ = tiny_sampler(num_grads=160)
    sampler.method = "auto"

    def untraceable(self):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(GradientSampler, "row_grads", untraceable)
    rows = sampler.sample()
    assert sampler.choice.method == "loop" and list(sampler.choice.rows_per_s) == ["loop"]
    reference, _ = tiny_sampler(num_grads=160)
    reference.method = "loop"
    assert torch.equal(rows, reference.sample())


@pytest.mark.parametrize(("change", "why"), [
    ({"labels": "sampled"}, "sampled labels"),
    ({"num_grads": 8}, "fewer than 16 gradients"),
    ({"num_grads": 64}, "too few gradients to calibrate"),
    ({"grad_batch": 2}, "grad_batch > 1"),
])
def test_calibration_is_skipped_where_a_choice_could_change_more_than_speed(change, why):
    sampler, _ = tiny_sampler(num_grads=change.get("num_grads", 64))
    for key, value in change.items():
        setattr(sampler, key, value)
    sampler.method = "auto"
    sampler.sample()
    assert why in sampler.choice.reason and sampler.choice.rows_per_s == {}


# -- the plan counts the estimator's passes over a disk store ----------------------------
def test_woodfisher_passes_over_the_store_follow_whether_its_factors_are_kept():
    from wfcore.plugins.woodfisher import WoodFisher, WoodFisherOptions

    from wfcore.fisher.gradients import ParamLayout

    layout = ParamLayout({"w": torch.zeros(64, 100)})
    roomy = WoodFisher(WoodFisherOptions(block_size=100, max_memory_gb=1.0))
    tight = WoodFisher(WoodFisherOptions(block_size=100, max_memory_gb=0.0002))
    assert roomy.cost(layout, 50, "cpu").store_passes == 1.0  # factors kept for the update
    assert tight.cost(layout, 50, "cpu").store_passes == 2.0  # the update reads it again
    assert roomy.cost(layout, 50, "cpu").update_store_passes == 0.0
    assert tight.cost(layout, 50, "cpu").update_store_passes == 1.0  # in the prune stage


def test_the_plan_splits_its_seconds_into_the_stages_of_a_step():
    from wfcore.fisher.plan import Plan

    plan = Plan(d=10, m=4, grad_batch=1, estimator="woodfisher", store_place="disk",
                store_dir=".", store_bytes=400, model_bytes=40, working_bytes=0, peak_bytes=0,
                memory_available=1, disk_available=1, gradient_flops=0.0, algebra_flops=0.0,
                gradient_seconds=5.0, algebra_seconds=3.0, store_passes=2.0,
                store_read_seconds=8.0, update_algebra_seconds=1.0, update_store_passes=1.0,
                safeguard_seconds=0.5)
    assert plan.stages() == {"gradients": 5.0, "estimate": 2.0 + 4.0, "prune": 1.0 + 4.0 + 0.5}
    assert plan.as_dict()["stages"] == plan.stages()
    assert sum(plan.stages().values()) == 5.0 + 3.0 + 8.0 + 0.5  # the step's estimate, whole


def test_woodfisher_times_a_piece_of_its_algebra_for_the_plan():
    from wfcore.plugins.woodfisher import WoodFisher, WoodFisherOptions, algebra_flops

    from wfcore.fisher.gradients import ParamLayout

    small = ParamLayout({"w": torch.zeros(8, 100)})
    large = ParamLayout({"w": torch.zeros(800, 100)})  # a hundred times the blocks
    estimator = WoodFisher(WoodFisherOptions(block_size=100, form="dual"))
    fit_s, update_s = estimator.stage_seconds(large, 50, "cpu")
    assert 0 < fit_s < 60 and 0 < update_s < 60
    fit_flops, update_flops = algebra_flops(large, 100, "dual", 50)
    cost = estimator.cost(large, 50, "cpu")
    assert cost.flops == fit_flops + update_flops and cost.update_flops == update_flops
    assert algebra_flops(small, 100, "dual", 50)[0] * 100 == fit_flops


def test_the_plan_times_rows_the_way_the_sampler_takes_them():
    from wfcore.fisher.plan import row_seconds

    sampler, model = tiny_sampler()
    x, y = sampler._load(torch.tensor([0]))
    for method in ("auto", "vmap", "loop"):
        seconds = row_seconds(model, sampler.params, x, nn.CrossEntropyLoss(), y, 1, method)
        assert 0 < seconds < 1


def test_the_plan_times_the_stores_writes_where_the_run_would_write(tmp_path):
    from wfcore.fisher.plan import write_seconds
    from wfcore.fisher.store import StorePlan

    store = StorePlan(m=1000, d=5000, dtype="float16", place="disk",
                      directory=str(tmp_path / "run" / "not-made-yet"), device="cpu",
                      pin=False, shared=False)
    assert write_seconds(store, 4) > 0
    assert list(tmp_path.iterdir()) == []  # probed in the nearest parent, nothing left
    (tmp_path / "file").write_text("")  # a directory that cannot be: not timed, no error
    blocked = StorePlan(**{**store.__dict__, "directory": str(tmp_path / "file" / "x")})
    assert write_seconds(blocked, 4) == 0.0


def test_the_plan_times_the_passes_over_a_disk_store(capsys):
    from pathlib import Path

    from wfcore import cli

    config = str(Path(__file__).parents[1] / "configs" / "mnist_mlpnet.yaml")
    for store, said in (("disk", True), ("memory", False)):
        assert cli.main(["plan", config, "estimator.name=woodfisher",
                         f"fisher.store={store}"]) == 0
        out = capsys.readouterr().out
        assert ("1 pass(es) over the disk store" in out) == said, out


def test_vmap_chunk_sizes_give_the_same_rows_bit_for_bit():
    rows = []
    for chunk in (1, 5, 24):
        sampler, _ = tiny_sampler()
        sampler._chunk_rows = lambda chunk=chunk: chunk
        rows.append(sampler.sample())
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])


def test_the_choice_is_part_of_the_samplers_state():
    sampler, _ = tiny_sampler(num_grads=160)
    sampler.method = "auto"
    sampler.sample()
    state = sampler.state_dict()
    resumed, _ = tiny_sampler(num_grads=160)
    resumed.method = "auto"
    resumed.load_state_dict(state)
    assert resumed.choice == sampler.choice and resumed.method == sampler.choice.method
