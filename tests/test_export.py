"""Meta-parameter files: save_meta_params / load_meta_params round trips and refusals."""

import json
import os
from pathlib import Path

import pytest
import torch

import fewshot
from fewshot.tasks import GaussianClusterTasks

FAST = dict(meta_steps=2, inner_steps=2, random_state=0)


@pytest.fixture(scope="module")
def sampler():
    return GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4, n_classes=12)


def fitted(cls, sampler, **kw):
    params = dict(FAST, **kw)
    params.update(batch_size=8) if cls is fewshot.FineTune else params.update(meta_batch_size=2)
    return cls(**params).meta_fit(sampler)


@pytest.mark.parametrize("cls", list(fewshot.SOLVERS.values()), ids=list(fewshot.SOLVERS))
def test_round_trip_predicts_as_the_trained_estimator(cls, sampler, tmp_path):
    est = fitted(cls, sampler)
    path = est.save_meta_params(tmp_path / "meta.pt")
    raw = torch.load(path, weights_only=True)  # tensors, strings and numbers only
    assert raw["solver"] == cls.__name__ and set(raw["meta_params"]) == set(est.params_)
    loaded = fewshot.load_meta_params(path)
    assert type(loaded) is cls and loaded.get_params() == est.get_params()
    for k in est.params_:
        assert torch.equal(loaded.params_[k], est.params_[k]), k
    task = sampler.sample(random_state=5)
    assert torch.equal(loaded.adapt(task.support).predict_proba(task.query.x),
                       est.adapt(task.support).predict_proba(task.query.x))
    tasks = sampler.sample(4, random_state=6)
    assert loaded.evaluate(tasks).mean == est.evaluate(tasks).mean


def test_learned_steps_are_saved(sampler, tmp_path):
    est = fitted(fewshot.MetaSGD, sampler)
    loaded = fewshot.load_meta_params(est.save_meta_params(tmp_path / "m.pt"))
    rates = [k for k in loaded.params_ if k.startswith("inner_lr.")]
    assert rates and all(torch.equal(loaded.params_[k], est.params_[k]) for k in rates)


def test_warm_start_continues_from_the_file(sampler, tmp_path):
    est = fitted(fewshot.FOMAML, sampler)
    loaded = fewshot.load_meta_params(est.save_meta_params(tmp_path / "m.pt"), warm_start=True, meta_steps=1)
    start = {k: v.clone() for k, v in loaded.params_.items()}
    loaded.meta_fit(sampler)
    assert loaded.n_iter_ == 3 and any(not torch.equal(start[k], loaded.params_[k]) for k in start)
    fresh = fewshot.load_meta_params(tmp_path / "m.pt", meta_steps=1).meta_fit(sampler)
    assert fresh.n_iter_ == 1  # without warm_start, meta_fit starts afresh


def test_a_network_object_must_be_given_again(sampler, tmp_path):
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    est = fitted(fewshot.MAML, sampler, model=net())
    path = est.save_meta_params(tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"whose model was a nn.Module \(torch.nn.modules.container.Sequential\)"
                                         r".*load_meta_params\(path, model=\.\.\.\)"):
        fewshot.load_meta_params(path)
    loaded = fewshot.load_meta_params(path, model=net())
    task = sampler.sample(random_state=1)
    assert torch.equal(loaded.adapt(task.support).predict(task.query.x), est.adapt(task.support).predict(task.query.x))
    small = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"do not fit the MAML's network: 0.bias \(8,\) in the file vs \(5,\)"):
        fewshot.load_meta_params(path, model=small)


def test_refusals(sampler, tmp_path):
    est = fitted(fewshot.FOMAML, sampler)
    with pytest.raises(ValueError, match="not meta-trained yet"):
        fewshot.FOMAML().save_meta_params(tmp_path / "x.pt")
    ckpt = tmp_path / "ckpt.pt"
    fewshot.FOMAML(**FAST, meta_batch_size=2).meta_fit(sampler, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"not a fewshot meta-parameter file \(it is a meta_fit checkpoint"):
        fewshot.load_meta_params(ckpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable fewshot meta-parameter file"):
        fewshot.load_meta_params(junk)
    path = est.save_meta_params(tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"FOMAML has no parameter\(s\) \['lam'\]"):
        fewshot.load_meta_params(path, lam=1.0)


SHIPPED = Path(__file__).resolve().parents[1] / "results" / "omniglot-tuned-2000-new-estimators" / "MAMLPlusPlus"


def test_shipped_omniglot_meta_parameters_adapt_at_once():
    """The meta-parameters shipped with the results load into an estimator that adapts to new
    characters without training; with the data, they reproduce the run's own test scores."""
    est = fewshot.load_meta_params(SHIPPED / "meta_params.pt")
    assert type(est) is fewshot.MAMLPlusPlus and est.input_shape_ == (1, 28, 28) and est.n_outputs_ == 5
    support_x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    pred = est.adapt((support_x.numpy(), [0, 1, 2, 3, 4])).predict(support_x.numpy())
    assert pred.shape == (5,)
    if not os.environ.get("FEWSHOT_DATA"):
        pytest.skip("the comparison with the run's scores needs Omniglot (FEWSHOT_DATA)")
    from fewshot.compare import _run

    config = json.loads((SHIPPED / "config.json").read_text())
    result = json.loads((SHIPPED / "result.json").read_text())
    mean = _run._evaluate(est, _run.make_samplers(config).test, 50, config["eval_seed"])[0]
    assert mean == pytest.approx(sum(result["scores"][:50]) / 50, abs=1e-12)


RESULTS = SHIPPED.parents[1]
SETTING_RUNS = sorted(run.parent for setting in ("5w5s", "20w1s", "20w5s")
                      for run in (RESULTS / f"omniglot-{setting}-2000").glob("*/result.json"))


@pytest.mark.parametrize("run", SETTING_RUNS, ids=[f"{r.parent.name}/{r.name}" for r in SETTING_RUNS])
def test_every_setting_run_ships_meta_parameters_matching_its_config(run):
    """Each finished run of the 5-way 5-shot and 20-way tables ships its meta-parameters, and they
    load as the estimator its config.json describes: the solver, its settings and n_way outputs."""
    config = json.loads((run / "config.json").read_text())
    est = fewshot.load_meta_params(run / "meta_params.pt")
    assert type(est).__name__ == config["solver"] and est.n_outputs_ == config["n_way"]
    assert {k: est.get_params()[k] for k in config["params"]} == config["params"]
