"""MetaGridSearch and meta_train_test_split."""

import numpy as np
import pytest
import torch
from joblib import parallel_config
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import ParameterGrid, ParameterSampler

import fewshot
from fewshot.exceptions import NotFittedError
from fewshot.model_selection import MetaGridSearch, meta_train_test_split
from fewshot.tasks import GaussianClusterTasks, LinearRegressionTasks, SinusoidTasks

GRID = {"lam": [0.5, 2.0], "inner_lr": [0.01, 0.05]}


def imaml(**kw):
    return fewshot.IMAML(**dict(dict(meta_steps=3, inner_steps=2, meta_batch_size=2, random_state=0), **kw))


@pytest.fixture(scope="module")
def sinusoid():
    return SinusoidTasks(k_shot=5, n_query=5)


@pytest.fixture(scope="module")
def serial(sinusoid):
    return MetaGridSearch(imaml(), GRID, n_tasks=10, n_jobs=1, random_state=0).meta_fit(sinusoid, sinusoid)


def test_two_jobs_give_the_same_results_as_one(serial, sinusoid):
    parallel = MetaGridSearch(imaml(), GRID, n_tasks=10, n_jobs=2, random_state=0)
    parallel.meta_fit(sinusoid, sinusoid)
    a, b = serial.cv_results_, parallel.cv_results_
    assert a.keys() == b.keys()
    for key in ("mean_test_score", "std_test_score", "ci95_test_score", "rank_test_score"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["params"] == b["params"]
    assert parallel.best_index_ == serial.best_index_ and parallel.best_score_ == serial.best_score_
    for k, v in serial.best_estimator_.params_.items():
        assert torch.equal(parallel.best_estimator_.params_[k], v)


def test_threading_backend_matches_and_restores_threads(serial, sinusoid):
    threads = torch.get_num_threads()
    threaded = MetaGridSearch(imaml(), GRID, n_tasks=10, n_jobs=2, random_state=0)
    with parallel_config(backend="threading"):
        threaded.meta_fit(sinusoid, sinusoid)
    assert torch.get_num_threads() == threads
    np.testing.assert_array_equal(threaded.cv_results_["mean_test_score"],
                                  serial.cv_results_["mean_test_score"])


def test_cv_results_format_and_best(serial, sinusoid):
    res = serial.cv_results_
    candidates = list(ParameterGrid(GRID))
    assert res["params"] == candidates and serial.n_candidates_ == 4
    for name in ("lam", "inner_lr"):
        column = res[f"param_{name}"]
        assert isinstance(column, np.ma.MaskedArray) and not column.mask.any()
        assert list(column) == [c[name] for c in candidates]
    for key in ("mean_fit_time", "std_fit_time", "mean_score_time", "std_score_time", "mean_test_score",
                "std_test_score", "rank_test_score"):
        assert res[key].shape == (4,)
    assert (res["mean_fit_time"] > 0).all() and res["rank_test_score"].dtype == np.int32
    assert sorted(res["rank_test_score"]) == [1, 2, 3, 4]
    best = serial.best_index_
    assert res["rank_test_score"][best] == 1 and res["mean_test_score"][best] == res["mean_test_score"].max()
    assert serial.best_params_ == candidates[best]
    assert serial.best_score_ == res["mean_test_score"][best]
    # Every candidate was scored on the same pool: re-scoring the best estimator on it reproduces.
    pool = sinusoid.sample(10, random_state=0)
    estimator = serial.best_estimator_
    assert estimator.get_params()["lam"] == serial.best_params_["lam"] and estimator.n_iter_ == 3
    evaluation = serial.evaluate(pool)
    assert evaluation.mean == serial.best_score_
    assert np.std(evaluation.scores) == res["std_test_score"][best]
    assert serial.score(pool) == serial.best_score_
    task = sinusoid.sample(random_state=3)
    assert serial.adapt(task.support).predict(task.query.x).shape == (5, 1)


def test_list_of_grids_masks_missing_parameters(sinusoid):
    grids = [{"lam": [1.0]}, {"inner_lr": [0.01, 0.02]}]
    search = MetaGridSearch(imaml(meta_steps=1), grids, n_tasks=4, random_state=0)
    search.meta_fit(sinusoid, sinusoid)
    lam, lr = search.cv_results_["param_lam"], search.cv_results_["param_inner_lr"]
    assert list(lam.mask) == [False, True, True] and list(lr.mask) == [True, False, False]
    assert lam[0] == 1.0 and list(lr[1:]) == [0.01, 0.02]


def test_parameter_sampler_and_fixed_task_batch(sinusoid):
    from scipy.stats import loguniform

    sampler = ParameterSampler({"lam": loguniform(0.1, 10), "inner_steps": [1, 2]}, n_iter=3, random_state=0)
    pool = sinusoid.sample(6, random_state=1)
    search = MetaGridSearch(imaml(meta_steps=1), sampler, refit=False).meta_fit(sinusoid, pool)
    assert search.cv_results_["params"] == list(sampler)
    assert not hasattr(search, "best_estimator_")
    with pytest.raises(AttributeError, match="refit=False"):
        search.score(pool)


def test_divergent_candidates_score_error_score(sinusoid):
    grid = {"inner_lr": [0.01, 1e6]}  # the second overflows during the fixed-step inner loop
    with pytest.warns(FitFailedWarning, match="diverged"):
        search = MetaGridSearch(imaml(meta_steps=2, backtracking=False), grid, n_tasks=4, random_state=0)
        search.meta_fit(sinusoid, sinusoid)
    assert np.isnan(search.cv_results_["mean_test_score"][1])
    assert list(search.cv_results_["rank_test_score"]) == [1, 2] and search.best_index_ == 0
    with pytest.warns(FitFailedWarning), pytest.raises(ValueError, match="lower error_score"):
        MetaGridSearch(imaml(meta_steps=2, backtracking=False), grid, n_tasks=4,
                       error_score=1.0).meta_fit(sinusoid, sinusoid)
    with pytest.raises(fewshot.exceptions.DivergenceError):
        MetaGridSearch(imaml(meta_steps=2, backtracking=False), grid, n_tasks=4,
                       error_score="raise").meta_fit(sinusoid, sinusoid)


def test_invalid_arguments(sinusoid):
    with pytest.raises(ValueError, match="no_such"):
        MetaGridSearch(imaml(), {"no_such": [1]}).meta_fit(sinusoid, sinusoid)
    with pytest.raises(TypeError, match="estimator must be a fewshot meta-learner"):
        MetaGridSearch(object(), GRID).meta_fit(sinusoid, sinusoid)
    with pytest.raises(TypeError, match="parameter dicts"):
        MetaGridSearch(imaml(), [("lam", 1.0)]).meta_fit(sinusoid, sinusoid)
    with pytest.raises(ValueError, match="no candidate"):
        MetaGridSearch(imaml(), iter([])).meta_fit(sinusoid, sinusoid)
    with pytest.raises(ValueError, match="n_tasks"):
        MetaGridSearch(imaml(), GRID, n_tasks=0).meta_fit(sinusoid, sinusoid)
    with pytest.raises(TypeError, match="val_tasks"):
        MetaGridSearch(imaml(), GRID).meta_fit(sinusoid, "val")
    with pytest.raises(NotFittedError):
        MetaGridSearch(imaml(), GRID).score(sinusoid)


def test_search_is_a_scikit_learn_estimator():
    from sklearn.base import clone

    search = MetaGridSearch(imaml(), GRID, n_jobs=2)
    twin = clone(search)
    assert twin.get_params()["estimator__lam"] == 1.0 and twin.n_jobs == 2
    fresh = MetaGridSearch(imaml(), GRID)
    assert vars(fresh).keys() == set(fresh.get_params(deep=False))


# --------------------------------------------------------------------------------------------------
# meta_train_test_split


def test_gaussian_clusters_split_into_disjoint_classes():
    sampler = GaussianClusterTasks(n_way=3, k_shot=1, n_query=2, n_features=4, n_classes=20, noise=1e-3)
    train, val = meta_train_test_split(sampler, test_size=0.25, random_state=0)
    assert (train.n_classes, val.n_classes) == (15, 5) and train.n_pretrain_outputs == 15
    rows = lambda c: {tuple(r.tolist()) for r in c}  # noqa: E731
    assert rows(train.centres).isdisjoint(rows(val.centres))
    assert rows(train.centres) | rows(val.centres) == rows(sampler.centres)
    again, _ = meta_train_test_split(sampler, test_size=0.25, random_state=0)
    assert torch.equal(again.centres, train.centres)
    other, _ = meta_train_test_split(sampler, test_size=0.25, random_state=1)
    assert not torch.equal(other.centres, train.centres)
    assert sampler.n_classes == 20  # the original is unchanged
    # Tasks of each part come from its own classes only.
    batch = val.sample(8, random_state=0)
    nearest = torch.cdist(batch.support.x.reshape(-1, 4), sampler.centres).argmin(1)
    val_classes = {i for i, c in enumerate(sampler.centres) if tuple(c.tolist()) in rows(val.centres)}
    assert set(nearest.tolist()) <= val_classes
    est = fewshot.FOMAML(meta_steps=1, inner_steps=1, meta_batch_size=2, random_state=0).meta_fit(train)
    assert len(est.evaluate(val, n_tasks=2).scores) == 2


def test_split_sizes_are_checked():
    sampler = GaussianClusterTasks(n_way=3, k_shot=1, n_query=2, n_features=4, n_classes=8)
    assert meta_train_test_split(sampler, test_size=3)[1].n_classes == 3
    with pytest.raises(ValueError, match="fewer than n_way=3"):
        meta_train_test_split(sampler, test_size=2)
    with pytest.raises(ValueError, match="test_size"):
        meta_train_test_split(sampler, test_size=1.5)
    with pytest.raises(ValueError, match="at least one"):
        meta_train_test_split(sampler, test_size=8)


def test_regression_families_are_returned_as_copies():
    for sampler in (SinusoidTasks(), LinearRegressionTasks(n_features=3)):
        train, val = meta_train_test_split(sampler, random_state=0)
        assert type(train) is type(val) is type(sampler) and train is not sampler and val is not train
        assert repr(train) == repr(val) == repr(sampler)


def test_unsplittable_classification_family():
    class Custom(GaussianClusterTasks.__mro__[1]):  # a bare TaskSampler
        task_type = "classification"

    with pytest.raises(TypeError, match="cannot split the classes of Custom"):
        meta_train_test_split(Custom())


def _tiny_omniglot(root, n_characters):
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(0)
    layout = {"images_background": {"Alpha": 1}, "images_evaluation": {"Gamma": n_characters}}
    for name, alphabets in layout.items():
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                folder = root / "omniglot-py" / name / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, 21):
                    im = Image.new("1", (105, 105), 1)
                    ImageDraw.Draw(im).line([tuple(int(v) for v in rng.randint(5, 100, 2)) for _ in range(3)],
                                            fill=0, width=4)
                    im.save(folder / f"{c:04d}_{d:02d}.png")
    return {name: (len(a), sum(a.values())) for name, a in layout.items()}


def test_omniglot_split_keeps_rotations_of_a_character_together(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from fewshot.datasets import OmniglotTasks, _omniglot

    monkeypatch.setattr(_omniglot, "_EXPECTED", _tiny_omniglot(tmp_path, 6))
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))  # keep the user's cache of the real data
    sampler = OmniglotTasks(n_way=3, k_shot=1, n_query=2, split="lake", subset="test", data_home=tmp_path,
                            augment_rotations=True)
    assert sampler.n_classes == 24
    train, val = meta_train_test_split(sampler, test_size=0.5, random_state=0)
    assert train.n_classes == val.n_classes == 12
    assert set(train.characters).isdisjoint(val.characters) and len(set(val.characters)) == 3
    assert sorted(train.class_names + val.class_names) == sorted(sampler.class_names)
    # The images of each class moved with it.
    images = sampler._x.view(24, 20, -1)
    for part in (train, val):
        for i, name in enumerate(part.class_names):
            j = sampler.class_names.index(name)
            assert torch.equal(part._x.view(part.n_classes, 20, -1)[i], images[j])
        batch = part.sample(2, random_state=0)
        assert batch.support.x.shape == (2, 3, 1, 28, 28)


def test_search_over_estimators_with_learned_steps(sinusoid):
    """Meta-SGD's and MAML++'s learned steps are meta-parameters like the weights: parallel
    candidates return them, and the refitted best estimator holds them."""
    for est, grid in ((fewshot.MetaSGD(meta_steps=3, meta_batch_size=2, random_state=0), {"inner_lr": [0.01, 0.02]}),
                      (fewshot.MAMLPlusPlus(meta_steps=3, inner_steps=2, meta_batch_size=2, random_state=0),
                       {"multi_step_loss_steps": [0, 2]})):
        one = MetaGridSearch(est, grid, n_tasks=10, n_jobs=1, random_state=0).meta_fit(sinusoid, sinusoid)
        two = MetaGridSearch(est, grid, n_tasks=10, n_jobs=2, random_state=0).meta_fit(sinusoid, sinusoid)
        np.testing.assert_array_equal(one.cv_results_["mean_test_score"], two.cv_results_["mean_test_score"])
        learned = [k for k in one.best_estimator_.params_ if k.startswith("inner_lr.")]
        assert learned and all(torch.equal(one.best_estimator_.params_[k], two.best_estimator_.params_[k])
                               for k in one.best_estimator_.params_)
