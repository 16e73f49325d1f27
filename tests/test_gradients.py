"""The gradient sampler: torch.func per-sample gradients against one backward per row."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from wfcore.plugins.models import MLPNet, MnistCNN

from wfcore.errors import WfcoreError
from wfcore.fisher.gradients import GradientSampler
from wfcore.fisher.store import GradientStore
from wfcore.masks import Masks, select_params


class SmallBN(nn.Module):
    """Conv + BatchNorm + Dropout: layers whose eval mode matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).flatten(1)))


class Unlabelled(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 1, 28, 28, generator=gen),
                         torch.randint(0, 10, (64,), generator=gen))


def sampler(model, data, **kw):
    torch.manual_seed(0)
    params = select_params(model, None)
    masks = Masks(params)
    kw.setdefault("num_grads", 20)
    return GradientSampler(model, params, masks.keep, data, nn.CrossEntropyLoss(),
                           progress=False, **kw), masks


@pytest.mark.parametrize("make", [MLPNet, MnistCNN, SmallBN])
@pytest.mark.parametrize("grad_batch", [1, 3])
def test_vmap_equals_one_backward_per_row(data, make, grad_batch):
    torch.manual_seed(1)
    model = make()
    model.train()
    rows = {}
    for method in ("vmap", "loop"):
        s, _ = sampler(model, data, num_grads=10, grad_batch=grad_batch, method=method)
        rows[method] = s.sample()
        assert s.method == method  # no silent fallback
    torch.testing.assert_close(rows["vmap"], rows["loop"], rtol=1e-4, atol=1e-6)
    assert model.training  # eval while sampling, then restored


def test_rows_are_the_per_sample_gradients(data):
    model = MLPNet()
    s, _ = sampler(model, data, num_grads=3)
    G = s.sample()
    first = s._order[:3]  # the samples the rows used
    for row, i in zip(G, first, strict=True):
        x, y = data[int(i)]
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        grads = torch.autograd.grad(loss, list(s.params.values()))
        torch.testing.assert_close(row, torch.cat([g.flatten() for g in grads]))


def test_pruned_coordinates_are_zero(data):
    model = MLPNet()
    s, masks = sampler(model, data)
    keep = {n: torch.rand(k.shape) > 0.5 for n, k in masks.keep.items()}
    masks.set(keep)
    G = s.sample()
    flat_keep = s.layout.flatten(masks.keep)
    assert (G[:, ~flat_keep] == 0).all()
    assert (G[:, flat_keep] != 0).float().mean() > 0.3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage(data, dtype):
    model = MnistCNN()
    full, _ = sampler(model, data)
    low, _ = sampler(model, data, dtype=dtype)
    G32, G16 = full.sample(), low.sample()
    assert G16.dtype == getattr(torch, dtype)
    torch.testing.assert_close(G16.float(), G32, rtol=1e-2, atol=1e-3 * G32.abs().max().item())
    assert GradientStore.from_tensor(G16).mean().dtype == torch.float32


def test_offload_keeps_the_buffer_in_cpu_memory(data):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MLPNet().to(device)
    s, _ = sampler(model, data, device=device, offload=True)
    G = s.sample()
    assert G.device.type == "cpu"
    assert G.is_pinned() == (device == "cuda")


def test_non_finite_gradient_names_the_parameter(data):
    model = MLPNet()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    s, _ = sampler(model, data)
    with pytest.raises(WfcoreError, match="fc"):
        s.sample()


def test_flat_rows_masks_checks_and_names_the_parameter(data):
    model = MLPNet()
    s, _ = sampler(model, data)
    names = s.layout.names
    grads = {n: torch.full((2, *p.shape), 3e38) for n, p in s.params.items()}
    for n in names:  # prune every other weight of each parameter
        s.masks[n] = (torch.arange(s.params[n].numel()) % 2 == 0).view(s.params[n].shape)
    # finite values whose sum overflows: no error, and the pruned coordinates are zero
    rows = s._flat_rows(grads)
    expected = torch.cat([(grads[n] * s.masks[n]).reshape(2, -1) for n in names], 1)
    assert torch.equal(rows, expected) and not torch.isfinite(rows.sum())
    grads[names[-1]][1, 0] = float("inf")  # in the last parameter, at a kept weight
    with pytest.raises(WfcoreError, match=f"parameter '{names[-1]}'"):
        s._flat_rows(grads)


def test_sampled_labels_need_no_labels(data):
    model = MLPNet()
    s, _ = sampler(model, Unlabelled(data), labels="sampled")
    G = s.sample()
    assert torch.isfinite(G).all() and G.abs().sum() > 0
    s, _ = sampler(model, Unlabelled(data), labels="empirical")
    with pytest.raises(WfcoreError, match="labels=sampled"):
        s.sample()


def test_bad_arguments():
    with pytest.raises(WfcoreError, match="storage_dtype"):
        GradientSampler(MLPNet(), {}, {}, [], nn.CrossEntropyLoss(), num_grads=1, dtype="int8")
    with pytest.raises(WfcoreError, match="num_grads"):
        GradientSampler(MLPNet(), {}, {}, [], nn.CrossEntropyLoss(), num_grads=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(data):
    model = MnistCNN()
    rows = []
    for device in ("cpu", "cuda"):
        s, _ = sampler(model.to(device), data, device=device)
        rows.append(s.sample().cpu())
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-3, atol=1e-5)


def test_full_float32_restores_the_settings():
    from wfcore.fisher.precision import full_float32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_float32():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
