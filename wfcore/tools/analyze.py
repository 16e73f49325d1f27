"""`wfcore analyze`: how faithful is each curvature estimator to the exact Hessian?

Lifecycle (``analyze``): the dense model and the analysed parameters (``analyze.params``)
-> a plan that refuses an exact Hessian too big for memory or time -> the exact Hessian H,
empirical Fisher and true Fisher over ``analyze.samples`` training samples (wfcore/tools/exact.py)
-> every estimator of ``analyze.estimators`` fitted through the pipeline's PruningProblem
at each m of ``analyze.num_grads`` -> each curvature made explicit (F^-1 e_j for every j,
through ``inverse_mul``) and compared:

- inverse: relative error of ``inverse_diagonal()`` against diag((X + damp I)^-1), and the
  cosine and relative L2 error of F^-1 v against (X + damp I)^-1 v, for random and gradient
  directions v, X each exact curvature (medians over the directions);
- the OBS question: for single weights, the predicted loss increase w_q^2 / (2 [F^-1]_qq)
  against the actual increase of L after the single-weight OBS update (Spearman rank
  correlation, and how much of the lowest-ranked fraction the actual increases would also
  rank lowest); for pruned sets, the config's scorer and allocator at each of
  ``analyze.sparsities``: the summed scores against the actual increase after the update.

The exact curvatures themselves, damped, go through the same comparisons as references.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from wfcore import config as config_mod
from wfcore import files, manager
from wfcore.errors import ConfigError, WfcoreError
from wfcore.fisher.gradients import GradientSampler, ParamLayout
from wfcore.interfaces import (
    Allocator,
    Curvature,
    DataBundle,
    Loss,
    PruningProblem,
    Scorer,
    Tensors,
)
from wfcore.masks import Masks, select_params
from wfcore.run import directory as rundir
from wfcore.run.pipeline import (
    build_model,
    dense_model,
    dense_provenance,
    instantiate,
    load_data,
    loss_function,
    resolve_device,
)
from wfcore.tools import analyze_dir
from wfcore.tools.exact import HVP_COLUMNS, DenseCurvature, ExactLoss, damped_inverse

log = logging.getLogger(__name__)

REFERENCES = ("hessian", "empirical_fisher", "true_fisher")
DENSE_MATRICES = 10  # (d, d) float64 matrices alive at once: exact curvatures, inverses, M


def analysed_params(cfg: DictConfig, model: nn.Module) -> dict[str, nn.Parameter]:
    patterns = cfg.analyze.params if cfg.analyze.params is not None else cfg.model.params
    key = "analyze.params" if cfg.analyze.params is not None else "model.params"
    try:
        params = select_params(model, patterns, cfg.model.prunable)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("'model.params'", f"'{key}'")) from None
    if not params:
        raise ConfigError(f"config key '{key}': no parameters selected")
    return params


def memory_limit(cfg: DictConfig) -> float:
    """Bytes the exact matrices may take: analyze.max_memory_gb, else half the machine's."""
    if cfg.analyze.max_memory_gb is not None:
        return cfg.analyze.max_memory_gb * 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2


def narrower(sizes: dict[str, int], fits) -> list[str]:
    """The most parameters, smallest first, whose total size ``fits``."""
    chosen, total = [], 0
    for name, numel in sorted(sizes.items(), key=lambda item: item[1]):
        if fits(total + numel):
            chosen.append(name)
            total += numel
    return chosen


def refuse(cfg: DictConfig, sizes: dict[str, int], why: str, fits) -> None:
    d = sum(sizes.values())
    chosen = narrower(sizes, fits)
    hint = (f"narrow analyze.params, e.g. analyze.params=[{','.join(chosen)}] "
            f"({sum(sizes[n] for n in chosen)} weights)" if chosen else
            "no single parameter fits: raise analyze.max_memory_gb / analyze.max_minutes")
    raise WfcoreError(f"analyze.params: the exact Hessian over {d} weights of "
                      f"{len(sizes)} parameters {why}; {hint}")


def check_memory(cfg: DictConfig, sizes: dict[str, int]) -> dict[str, float]:
    limit = memory_limit(cfg)
    need = lambda d: DENSE_MATRICES * 8 * d * d  # noqa: E731
    d = sum(sizes.values())
    if need(d) > limit:
        refuse(cfg, sizes, f"needs {need(d) / 2**30:.1f} GiB (limit {limit / 2**30:.1f} GiB)",
               lambda k: need(k) <= limit)
    return {"weights": d, "memory_gib": need(d) / 2**30, "memory_limit_gib": limit / 2**30}


def check_time(cfg: DictConfig, exact: ExactLoss, sizes: dict[str, int]) -> float:
    """Seconds the exact Hessian should take, from one timed chunk of columns."""
    x, y = exact.x[:exact.batch_size], exact.y[:exact.batch_size]
    V = torch.eye(exact.d, dtype=exact.w0.dtype, device=exact.w0.device)[:HVP_COLUMNS]
    exact.hessian_columns(V[:1], x, y)  # the first call traces; time the second
    start = time.perf_counter()
    exact.hessian_columns(V, x, y)
    per_column = (time.perf_counter() - start) / len(V) * math.ceil(exact.num_samples / len(x))
    limit = cfg.analyze.max_minutes * 60
    if per_column * exact.d > limit:
        refuse(cfg, sizes, f"would take about {per_column * exact.d / 60:.0f} min "
               f"(analyze.max_minutes={cfg.analyze.max_minutes:g})",
               lambda k: per_column * k <= limit)
    return per_column * exact.d


def analysis_samples(cfg: DictConfig, dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``analyze.samples`` of a seeded permutation of the training set."""
    n = len(dataset) if cfg.analyze.samples is None else min(cfg.analyze.samples, len(dataset))
    if n < 1:
        raise ConfigError("config key 'analyze.samples': must be >= 1")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    x, y = default_collate([dataset[int(i)] for i in order[:n]])[:2]
    return x.to(device), y.to(device)


def build_estimators(cfg: DictConfig, plugins: manager.Plugins) -> dict[str, manager.Chosen]:
    """name -> the estimator chosen, its options validated, for every analyze.estimators
    name (built afresh for each fit)."""
    out = {}
    for name in cfg.analyze.estimators:
        if name in cfg.analyze.options:
            values, where = config_mod.to_dict(cfg.analyze.options[name]), f"analyze.options.{name}"
        elif cfg.estimator.name == name:
            values = {k: v for k, v in config_mod.to_dict(cfg.estimator).items() if k != "name"}
            where = "estimator"
        else:
            values, where = {}, f"analyze.options.{name}"
        out[name] = plugins.choose("estimators", manager.Section(name, values or {}, where,
                                                                 "analyze.estimators"))
    return out


def materialise(curvature: Curvature, layout: ParamLayout,
                device: torch.device) -> torch.Tensor:
    """(d, d) float64 M with M e_j = curvature.inverse_mul(e_j): the explicit F^-1."""
    d = layout.d
    M = torch.zeros(d, d, dtype=torch.float64)
    for j in tqdm(range(d), desc="explicit F^-1", leave=False, delay=1):
        e = torch.zeros(d, device=device)
        e[j] = 1.0
        M[:, j] = layout.flatten(curvature.inverse_mul(layout.unflatten(e))).double().cpu()
    return M


def ranks(v: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(v)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def inverse_metrics(M: torch.Tensor, diag: torch.Tensor, inverses: dict[str, torch.Tensor],
                    directions: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diag and IHVP errors of the explicit inverse M against each damped exact inverse."""
    out = {}
    for ref, R in inverses.items():
        row = {"diag_rel_error": float((diag - R.diagonal()).norm() / R.diagonal().norm())}
        for kind, V in directions.items():  # V (k, d)
            exact, est = V @ R, V @ M.T
            cos = torch.nn.functional.cosine_similarity(est, exact, dim=1)
            rel = (est - exact).norm(dim=1) / exact.norm(dim=1)
            row[f"ihvp_{kind}_cos"] = float(cos.median())
            row[f"ihvp_{kind}_rel_error"] = float(rel.median())
        out[ref] = row
    return out


@dataclass
class Fitting:
    """What fitting an estimator needs: the model and its data, as the pipeline builds them."""

    model: nn.Module
    params: dict[str, nn.Parameter]  # the analysed parameters, in layout order
    data: DataBundle
    loss_fn: Loss
    device: torch.device
    estimators: dict[str, manager.Chosen]  # name -> the estimator chosen by the config


@dataclass
class References:
    """What every curvature is compared with, computed once."""

    exact: ExactLoss
    H: torch.Tensor  # (d, d) the exact Hessian
    g: torch.Tensor  # (d,) the exact gradient
    loss0: float  # the loss at the dense weights
    inverses: dict[str, torch.Tensor]  # (d, d) damped exact inverses, by reference name
    directions: dict[str, torch.Tensor]  # (k, d) random and gradient directions
    weights: torch.Tensor  # (k,) flat indices of the single weights of the OBS question
    sparsities: list[float]
    scorer: Scorer
    allocator: Allocator


def single_weights(refs: References, M: torch.Tensor, diag: torch.Tensor) -> dict[str, Any]:
    """Predicted w_q^2 / (2 [F^-1]_qq) against the actual loss increase after the OBS
    update of each single weight q."""
    S = refs.weights
    w = refs.exact.w0.double().cpu()
    predicted = w[S] ** 2 / (2 * diag[S])
    W = w - (M[:, S] * (w[S] / M[S, S])).T  # (k, d): w + the single-weight OBS update
    W[torch.arange(len(S)), S] = 0.0
    actual = refs.exact.losses(W, desc="single weights") - refs.loss0
    ranking_error = {}
    for s in refs.sparsities:
        k = max(1, round(s * len(S)))
        low_predicted = set(torch.argsort(predicted)[:k].tolist())
        low_actual = set(torch.argsort(actual)[:k].tolist())
        ranking_error[str(s)] = 1.0 - len(low_predicted & low_actual) / k
    return {"spearman": spearman(predicted, actual), "ranking_error": ranking_error,
            "predicted": predicted.tolist(), "actual": actual.tolist()}


def pruned_set(refs: References, curvature: Curvature, scores: Tensors, gradient: Tensors,
               sparsity: float) -> dict[str, Any]:
    """The allocator's set at ``sparsity``: summed scores, the exact second-order Taylor
    value of the scorer's update and the actual loss increase after it."""
    layout, w = refs.exact.layout, refs.exact.w0
    weights = layout.unflatten(w.clone())
    keep = refs.allocator.allocate(scores, {n: torch.ones_like(t, dtype=torch.bool)
                                            for n, t in weights.items()}, sparsity)
    prune = {n: ~keep[n] for n in keep}
    row = {"sparsity": sparsity,
           "predicted": float(sum(scores[n][prune[n]].double().sum() for n in prune))}
    try:
        update = refs.scorer.update(weights, curvature, prune, gradient)
    except NotImplementedError as exc:
        return {**row, "error": str(exc)}
    dw = torch.zeros(layout.d, dtype=torch.float64) if update is None else \
        layout.flatten(update).double().cpu()
    flat_prune = layout.flatten(prune).cpu()
    dw[flat_prune] = -w.double().cpu()[flat_prune]  # the masks zero them
    row["taylor"] = float(0.5 * dw @ refs.H @ dw + refs.g @ dw)
    W = (w.double().cpu() + dw)[None]
    row["actual"] = float(refs.exact.losses(W, desc="pruned set")[0]) - refs.loss0
    return row


def evaluate(refs: References, curvature: Curvature, M: torch.Tensor) -> dict[str, Any]:
    """Every comparison of one curvature, M its explicit inverse (d, d)."""
    layout = refs.exact.layout
    diag = layout.flatten(curvature.inverse_diagonal()).double().cpu()
    gradient = layout.unflatten(refs.g.to(refs.exact.w0))
    scores = refs.scorer.scores(layout.unflatten(refs.exact.w0.clone()), curvature, gradient)
    return {"inverse": inverse_metrics(M, diag, refs.inverses, refs.directions),
            "single": single_weights(refs, M, diag),
            "sets": [pruned_set(refs, curvature, scores, gradient, s) for s in refs.sparsities]}


def heatmap_block(cfg: DictConfig, layout: ParamLayout) -> tuple[str, slice]:
    analyze_dir.check_heatmap_param(cfg, layout.names)
    name = cfg.analyze.heatmap_param or layout.names[0]
    start = layout.offsets[name]
    return name, slice(start, start + min(cfg.analyze.heatmap_size, layout.numels[name]))


def fit(cfg: DictConfig, setup: Fitting, name: str, m: int) -> Curvature:
    """The estimator ``name`` fitted at m gradients, through the pipeline's PruningProblem."""
    masks = Masks(setup.params)
    f = cfg.fisher
    sampler = GradientSampler(setup.model, setup.params, masks.keep, setup.data.train,
                              setup.loss_fn, num_grads=m, grad_batch=f.grad_batch,
                              labels=f.labels, seed=cfg.seed, device=setup.device,
                              dtype=f.storage_dtype, offload=f.offload)
    problem = PruningProblem(setup.model, setup.params, masks, sampler, setup.loss_fn,
                             setup.device)
    estimator = setup.estimators[name].build(seed=cfg.seed)
    if estimator.needs_gradients:  # its m rows, in memory: the analysis is small by plan
        problem = problem.with_gradients()
    return estimator.fit(problem)


def exact_loss(cfg: DictConfig, setup: Fitting) -> ExactLoss:
    """The loss over the analysis samples, on a float64 copy of the model: loss changes far
    below float32's resolution still count; the estimators see the model as it is."""
    x, y = analysis_samples(cfg, setup.data.train, setup.device)
    model64 = copy.deepcopy(setup.model).double()
    params64 = {n: p for n, p in model64.named_parameters() if n in setup.params}
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    return ExactLoss(model64, params64, x, y, setup.loss_fn, batch_size=cfg.analyze.batch_size)


def analyze(cfg: DictConfig, plugins: manager.Plugins | None = None, *,
            force: bool = False) -> dict[str, Any]:
    """Run the analysis the config's ``analyze`` section describes; returns analysis.json.

    Its options and output directory are checked first; the directory is locked for the
    whole analysis, and an earlier analysis there is replaced only with ``force``.
    """
    from wfcore.tools.analyze_report import markdown, plot_all

    analyze_dir.check_options(cfg)
    run_dir = analyze_dir.output_of(cfg)
    analyze_dir.check_output(run_dir, force)
    with rundir.RunLock(run_dir):
        analyze_dir.check_output(run_dir, force)  # again: another analysis may have ended
        result, heatmaps = compute(cfg, plugins)
        analyze_dir.replace(run_dir)
        result["plots"] = plot_all(result, heatmaps, run_dir)
        files.write_text(run_dir / "analysis.md", markdown(result))
        files.write_json(run_dir / "analysis.json", result)
    result["run_dir"] = str(run_dir)
    return result


def compute(cfg: DictConfig, plugins: manager.Plugins | None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analysis itself: analysis.json's content and the heatmap blocks."""
    start = time.perf_counter()
    plugins = plugins or manager.build(cfg.plugins, base_dir=cfg.base_dir)
    a = cfg.analyze
    estimators = build_estimators(cfg, plugins)
    scorer, allocator = instantiate(cfg, "scorer", plugins), instantiate(cfg, "allocator",
                                                                        plugins)
    device = resolve_device(cfg.device)
    data = load_data(cfg, plugins)
    model = build_model(cfg, plugins, data).to(device)
    params = analysed_params(cfg, model)
    analyze_dir.check_heatmap_param(cfg, list(params))
    sizes = {n: p.numel() for n, p in params.items()}
    plan = check_memory(cfg, sizes)
    setup = Fitting(model, params, data, loss_function(cfg, data), device, estimators)
    dense_model(cfg, model, data, device, setup.loss_fn, dense_provenance(cfg, plugins, data))
    model.eval()
    exact = exact_loss(cfg, setup)
    plan["hessian_seconds_estimate"] = check_time(cfg, exact, sizes)
    log.info("analyze: %d weights of %s, %d samples; exact Hessian in about %.0f s",
             exact.d, ", ".join(params), exact.num_samples, plan["hessian_seconds_estimate"])
    layout = exact.layout
    H = exact.hessian()
    F_emp, F_true, sample_grads = exact.fishers(keep_gradients=a.directions)
    g = exact.gradient().cpu()
    matrices = {"hessian": H, "empirical_fisher": F_emp, "true_fisher": F_true}
    inverses, spectra = {}, {}
    for ref, X in matrices.items():
        inverses[ref], spectra[ref] = damped_inverse(X, a.damp, psd=a.psd or ref != "hessian")
    rng = torch.Generator().manual_seed(cfg.seed)
    directions = {
        "random": torch.randn(a.directions, exact.d, generator=rng, dtype=torch.float64),
        "gradient": torch.cat([g[None], sample_grads])[:max(1, a.directions)]}
    nonzero = (exact.w0.cpu() != 0).nonzero().squeeze(1)
    k = len(nonzero) if a.num_weights is None else min(a.num_weights, len(nonzero))
    weights = nonzero[torch.randperm(len(nonzero), generator=rng)[:k]]
    refs = References(exact, H, g, exact.loss(), inverses, directions, weights,
                      list(a.sparsities), scorer, allocator)
    heatmap_param, block = heatmap_block(cfg, layout)
    heatmaps = {ref: X[block, block] for ref, X in matrices.items()}
    results: list[dict[str, Any]] = []
    for ref in REFERENCES:
        log.info("analyze: exact %s (damp %g)", ref, a.damp)
        curvature: Curvature = DenseCurvature(inverses[ref], layout)
        results.append({"curvature": ref, "m": None,
                        **evaluate(refs, curvature, inverses[ref])})
    for name in a.estimators:
        for m in a.num_grads:
            log.info("analyze: %s at m=%d", name, m)
            t0 = time.perf_counter()
            curvature = fit(cfg, setup, name, m)
            M = materialise(curvature, layout, device)
            results.append({"curvature": name, "m": m, "fit_seconds": time.perf_counter() - t0,
                            **evaluate(refs, curvature, M)})
            if m == max(a.num_grads):
                heatmaps[name] = torch.linalg.pinv(M)[block, block]
    result = {"name": cfg.name, "config": config_mod.to_dict(cfg), "plan": plan,
              "params": sizes, "samples": exact.num_samples, "loss": refs.loss0,
              "spectra": spectra,
              "heatmap": {"param": heatmap_param, "start": block.start,
                          "size": block.stop - block.start},
              "results": results, "seconds": time.perf_counter() - start}
    return result, {k: v.numpy() for k, v in heatmaps.items()}
