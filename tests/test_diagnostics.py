"""diagnostics.meta_gradient_fidelity: each solver against the exact meta-gradient, in float64."""

import math

import pytest
import torch

import fewshot
from fewshot.diagnostics import meta_gradient_fidelity
from fewshot.tasks import LinearRegressionTasks, SinusoidTasks

COMMON = dict(meta_steps=0, inner_steps=3, inner_lr=0.05, dtype="float64", random_state=0)


@pytest.fixture(scope="module")
def sampler():
    return SinusoidTasks(k_shot=5, n_query=5)


@pytest.fixture(scope="module")
def tasks(sampler):
    return sampler.sample(4, random_state=0)


def prepare(sampler, cls, **kw):
    return cls(**{**COMMON, **kw}).meta_fit(sampler)


def by_key(rows):
    return {(r["method"], r["reference"]): r for r in rows}


def test_maml_matches_itself_and_first_order_does_not(sampler, tasks):
    ests = {"MAML": prepare(sampler, fewshot.MAML),
            "MAML memory-efficient": prepare(sampler, fewshot.MAML, memory_efficient=True),
            "FOMAML": prepare(sampler, fewshot.FOMAML)}
    rows = by_key(meta_gradient_fidelity(ests, tasks))
    assert set(rows) == {("MAML", "unrolled"), ("MAML memory-efficient", "unrolled"), ("FOMAML", "unrolled")}
    for name in ("MAML", "MAML memory-efficient"):
        r = rows[(name, "unrolled")]
        assert r["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
        assert r["rel_error_mean"] < 1e-12 and r["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-12)
        assert r["n_tasks"] == 4 and r["solver"] == "MAML"
    fo = rows[("FOMAML", "unrolled")]
    assert fo["cosine_mean"] < 0.999 and fo["rel_error_mean"] > 1e-3
    assert fo["cosine_std"] > 0  # differs from task to task


def test_imaml_with_converged_cg_matches_the_implicit_gradient(sampler, tasks):
    # lam large enough that I + H/lam is positive definite here, so that CG converges (at lam=2 it
    # is indefinite: IMAML's CG stops at its start while the reference solves the system)
    ests = [prepare(sampler, fewshot.IMAML, lam=50.0, cg_steps=100, cg_tol=1e-13),
            prepare(sampler, fewshot.NeumannMAML, lam=50.0, neumann_terms=2, neumann_lr=0.01)]
    rows = by_key(meta_gradient_fidelity(ests, tasks))
    exact = rows[("IMAML", "implicit")]
    assert exact["cosine_mean"] == pytest.approx(1.0, abs=1e-10) and exact["rel_error_mean"] < 1e-8
    assert rows[("NeumannMAML", "implicit")]["rel_error_mean"] > 1e-2  # a 2-term series is not exact
    assert {ref for _, ref in rows} == {"implicit", "unrolled_proximal"}
    assert exact["reference_residual_max"] < 1e-10  # the reference solved its systems
    assert rows[("IMAML", "unrolled_proximal")]["reference_residual_max"] is None


def test_implicit_and_unrolled_proximal_agree_when_the_inner_problem_is_solved():
    # Linear regression with a linear model: a quadratic inner problem that 300 small steps solve.
    sampler = LinearRegressionTasks(n_features=3, k_shot=6, n_query=6)
    kw = dict(meta_steps=0, inner_steps=300, inner_lr=0.05, lam=1.0, dtype="float64", random_state=0,
              model=torch.nn.Linear(3, 1))
    imaml = fewshot.IMAML(cg_steps=50, cg_tol=1e-14, **kw).meta_fit(sampler)
    rows = by_key(meta_gradient_fidelity([imaml], sampler.sample(3, random_state=1)))
    for ref in ("implicit", "unrolled_proximal"):
        assert rows[("IMAML", ref)]["cosine_mean"] == pytest.approx(1.0, abs=1e-9), ref
        assert rows[("IMAML", ref)]["rel_error_mean"] < 1e-6, ref


def test_reptile_reports_cosine_only(sampler, tasks):
    row = meta_gradient_fidelity([prepare(sampler, fewshot.Reptile)], tasks)[0]
    assert row["reference"] == "unrolled"
    assert -1 <= row["cosine_mean"] <= 1
    assert math.isnan(row["rel_error_mean"]) and math.isnan(row["rel_error_std"])
    assert row["norm_ratio_mean"] > 0


def test_shared_params_are_used(sampler, tasks):
    maml, fomaml = prepare(sampler, fewshot.MAML), prepare(sampler, fewshot.FOMAML, random_state=1)
    # default: the first estimator's params_, so FOMAML is evaluated at MAML's point
    default = meta_gradient_fidelity([maml, fomaml], tasks)
    at_maml = meta_gradient_fidelity([fomaml], tasks, params=maml.params_)
    assert default[1]["cosine_mean"] == at_maml[0]["cosine_mean"]
    own = meta_gradient_fidelity([fomaml], tasks)
    assert own[0]["cosine_mean"] != at_maml[0]["cosine_mean"]
    assert maml.params_.keys() == fomaml.params_.keys()


def test_bad_inputs_are_refused(sampler, tasks):
    maml = prepare(sampler, fewshot.MAML)
    with pytest.raises(TypeError, match="FineTune has no meta-gradient"):
        meta_gradient_fidelity([maml, fewshot.FineTune(meta_steps=0).meta_fit(sampler)], tasks)
    with pytest.raises(ValueError, match="params do not match"):
        meta_gradient_fidelity([maml], tasks, params={"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="empty"):
        meta_gradient_fidelity([], tasks)
    with pytest.raises(fewshot.exceptions.NotFittedError):
        meta_gradient_fidelity([fewshot.MAML()], tasks)
    with pytest.raises(TypeError, match="estimators must be"):
        meta_gradient_fidelity(maml, tasks)


def test_implicit_reference_solves_systems_that_cg_cannot(sampler, tasks):
    # At lam=2, I + H/lam is indefinite at this initialisation: CG (IMAML's own solver, even with
    # 100 iterations) stops at a direction of negative curvature; the reference does not.
    est = prepare(sampler, fewshot.IMAML, lam=2.0, cg_steps=100, cg_tol=1e-13)
    row = by_key(meta_gradient_fidelity([est], tasks))[("IMAML", "implicit")]
    assert row["cosine_mean"] < 0.99 and row["rel_error_mean"] > 0.1
    assert row["reference_residual_max"] < 1e-5  # ... and solves the indefinite systems (MINRES)
    tight = by_key(meta_gradient_fidelity([est], tasks, exact_cg_steps=300))[("IMAML", "implicit")]
    assert tight["reference_residual_max"] < 1e-10
    assert tight["cosine_mean"] == pytest.approx(row["cosine_mean"], abs=1e-6)


def test_fidelity_of_estimators_with_learned_steps_beside_plain_ones():
    """Meta-SGD and MAML++ have more meta-parameters than MAML: the shared point fixes the network's
    weights, their learned steps come from their own params_, and their exact references are
    through their own inner problems (Meta-SGD's gradient is exactly its reference; MAML++ in its
    multi-step-loss phase is not)."""
    import fewshot
    from fewshot.diagnostics import meta_gradient_fidelity

    sampler = fewshot.tasks.SinusoidTasks(k_shot=5, n_query=5)
    ests = [cls(meta_steps=0, inner_steps=2, dtype="float64", random_state=0).meta_fit(sampler)
            for cls in (fewshot.MAML, fewshot.MetaSGD, fewshot.MAMLPlusPlus)]
    rows = {r["method"]: r for r in meta_gradient_fidelity(ests, sampler.sample(3, random_state=0))}
    assert rows["MetaSGD"]["rel_error_mean"] < 1e-12 and rows["MAML"]["rel_error_mean"] < 1e-12
    assert rows["MAMLPlusPlus"]["rel_error_mean"] > 1e-3
