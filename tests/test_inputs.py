"""Every public input path: NumPy arrays are taken wherever tensors are, and each bad input a user
can make raises ``TypeError``/``ValueError`` (or fewshot's own exception) with a message naming the
problem.

The sweep is one table per part of the API; each row is ``case(id, call, error, match)`` where
``call(ctx)`` makes the mistake on the fixtures in ``ctx``.
"""

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import fewshot
from fewshot.exceptions import NotFittedError
from fewshot.tasks import (
    GaussianClusterTasks,
    LabeledSet,
    LinearRegressionTasks,
    SinusoidTasks,
    Task,
    TaskBatch,
    TaskSampler,
    as_task_batch,
)

FAST = dict(inner_steps=1, meta_steps=2, meta_batch_size=2, random_state=0)
CLASSES = dict(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=10)


def fit(sampler, cls=fewshot.MAML, **params):
    return cls(**{**FAST, **params}).meta_fit(sampler)


class Edited(TaskSampler):
    """3-way Gaussian-cluster tasks passed through ``edit(batch)``: a user's faulty sampler."""

    task_type, input_shape, n_outputs, n_way = "classification", (4,), 3, 3

    def __init__(self, edit, **attributes):
        self.edit, self.base = edit, GaussianClusterTasks(**CLASSES)
        self.__dict__.update(attributes)

    def _sample(self, n_tasks, generator):
        return self.edit(self.base._sample(n_tasks, generator))


def edit_support(fn):
    return Edited(lambda b: TaskBatch(LabeledSet(*fn(b.support.x, b.support.y)), b.query))


@pytest.fixture(scope="module")
def ctx():
    torch.manual_seed(0)
    clf_tasks, reg_tasks = GaussianClusterTasks(**CLASSES), SinusoidTasks(k_shot=4, n_query=3)
    clf, reg = fit(clf_tasks), fit(reg_tasks)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    xr, yr = torch.randn(4, 1), torch.randn(4, 1)
    return SimpleNamespace(
        clf_tasks=clf_tasks, reg_tasks=reg_tasks, clf=clf, reg=reg, x=x, y=y, xr=xr, yr=yr,
        xq=torch.randn(3, 4), yq=torch.tensor([0, 1, 2]), xrq=torch.randn(3, 1), yrq=torch.randn(3, 1),
        adapted=clf.adapt((x, y)), adapted_reg=reg.adapt((xr, yr)),
        task=clf_tasks.sample(random_state=0),
    )


def case(id, call, error, match, *, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(call, error, match, id=id, marks=marks)


def check(call, error, match, ctx):
    with pytest.raises(error, match=match):
        call(ctx)


# --------------------------------------------------------------------------------------------------
# Estimator parameters: checked when meta_fit starts

ESTIMATOR = [
    case("inner_lr=-0.1", lambda c: fit(c.clf_tasks, inner_lr=-0.1), ValueError, r"inner_lr must be > 0"),
    case("inner_lr='fast'", lambda c: fit(c.clf_tasks, inner_lr="fast"), ValueError,
         r"inner_lr must be a number or one of \['auto'\], got 'fast'"),
    case("inner_lr=nan", lambda c: fit(c.clf_tasks, inner_lr=math.nan),
         ValueError, r"inner_lr must be finite"),
    case("inner_steps=0", lambda c: fit(c.clf_tasks, inner_steps=0), ValueError, r"inner_steps must be >= 1"),
    case("inner_steps=1.5", lambda c: fit(c.clf_tasks, inner_steps=1.5), ValueError,
         r"inner_steps must be an integer, got 1.5"),
    case("adapt_steps=-1", lambda c: fit(c.clf_tasks, adapt_steps=-1),
         ValueError, r"adapt_steps must be >= 0"),
    case("meta_lr=0", lambda c: fit(c.clf_tasks, meta_lr=0), ValueError, r"meta_lr must be > 0"),
    case("meta_lr=inf", lambda c: fit(c.clf_tasks, meta_lr=math.inf), ValueError, r"meta_lr must be finite"),
    case("meta_batch_size=0", lambda c: fit(c.clf_tasks, meta_batch_size=0), ValueError,
         r"meta_batch_size must be >= 1"),
    case("meta_batch_size=2.0", lambda c: fit(c.clf_tasks, meta_batch_size=2.0), ValueError,
         r"meta_batch_size must be an integer"),
    case("meta_steps=-1", lambda c: fit(c.clf_tasks, meta_steps=-1), ValueError, r"meta_steps must be >= 0"),
    case("meta_steps='10'", lambda c: fit(c.clf_tasks, meta_steps="10"), ValueError,
         r"meta_steps must be an integer, got '10'"),
    case("grad_clip=0", lambda c: fit(c.clf_tasks, grad_clip=0), ValueError, r"grad_clip must be > 0"),
    case("meta_optimizer='lbfgs'", lambda c: fit(c.clf_tasks, meta_optimizer="lbfgs"), ValueError,
         r"meta_optimizer must be one of \['adam', 'adamw', 'sgd'\]"),
    case("meta_optimizer=nn.Linear", lambda c: fit(c.clf_tasks, meta_optimizer=torch.nn.Linear), ValueError,
         r"meta_optimizer .* torch.optim.Optimizer subclass"),
    case("meta_lr_schedule='exp'", lambda c: fit(c.clf_tasks, meta_lr_schedule="exp"), ValueError,
         r"meta_lr_schedule must be one of"),
    case("meta_lr_horizon=0", lambda c: fit(c.clf_tasks, meta_lr_horizon=0), ValueError,
         r"meta_lr_horizon must be >= 1"),
    case("task_threads=0", lambda c: fit(c.clf_tasks, task_threads=0),
         ValueError, r"task_threads must be >= 1"),
    case("transductive='yes'", lambda c: fit(c.clf_tasks, transductive="yes"), ValueError,
         r"transductive must be True or False"),
    case("full_history=1", lambda c: fit(c.clf_tasks, full_history=1), ValueError,
         r"full_history must be True or False"),
    case("verbose=-1", lambda c: fit(c.clf_tasks, verbose=-1), ValueError, r"verbose must be >= 0"),
    case("loss='hinge'", lambda c: fit(c.clf_tasks, loss="hinge"), ValueError, r"loss must be one of"),
    case("loss=3", lambda c: fit(c.clf_tasks, loss=3), ValueError, r"loss must be 'auto', .* or a callable"),
    case("loss='mse' on classification", lambda c: fit(c.clf_tasks, loss="mse"), ValueError,
         r"loss='mse' is for regression but the sampler gives classification tasks"),
    case("model='resnet'", lambda c: fit(c.clf_tasks, model="resnet"), ValueError, r"model must be one of"),
    case("model=3", lambda c: fit(c.clf_tasks, model=3),
         ValueError, r"model must be .* an nn.Module, got int"),
    case("model with 7 outputs", lambda c: fit(c.clf_tasks, model=torch.nn.Linear(4, 7)), ValueError,
         r"model outputs have shape \[2, 7\].*n_outputs=3"),
    case("model for 5 features", lambda c: fit(c.clf_tasks, model=torch.nn.Linear(5, 3)), ValueError,
         r"model cannot run on inputs of shape \[n, 4\]"),
    case("device='gpu9000'", lambda c: fit(c.clf_tasks, device="gpu9000"), ValueError, r"device must be"),
    case("dtype='float16'", lambda c: fit(c.clf_tasks, dtype="float16"), ValueError,
         r"dtype must be 'float32' or 'float64', got 'float16'"),
    case("memory_efficient='yes'", lambda c: fit(c.clf_tasks, memory_efficient="yes"), ValueError,
         r"memory_efficient must be one of"),
    case("IMAML lam=0", lambda c: fit(c.clf_tasks, fewshot.IMAML, lam=0.0), ValueError, r"lam must be > 0"),
    case("IMAML cg_steps=0", lambda c: fit(c.clf_tasks, fewshot.IMAML, cg_steps=0), ValueError, r"cg_steps"),
    case("Reptile inner_data='query'", lambda c: fit(c.clf_tasks, fewshot.Reptile, inner_data="query"),
         ValueError, r"inner_data must be one of"),
    case("FineTune batch_size=0",
         lambda c: fewshot.FineTune(meta_steps=1, batch_size=0).meta_fit(c.clf_tasks), ValueError,
         r"batch_size must be >= 1"),
    case("unknown parameter", lambda c: fewshot.IMAML(lamda=1.0), TypeError,
         r"unexpected keyword argument\(s\) \['lamda'\]"),
    case("warm_start='yes'", lambda c: fit(c.clf_tasks, warm_start="yes"), ValueError,
         r"warm_start must be True or False"),
    case("random_state=-1", lambda c: fit(c.clf_tasks, random_state=-1), ValueError,
         r"random_state must be None, an integer in \[0, 2\*\*32\) or a numpy RandomState, got -1"),
    case("random_state='seed'", lambda c: fit(c.clf_tasks, random_state="seed"), ValueError,
         r"random_state must be .*got 'seed'"),
    case("random_state=2**32", lambda c: fit(c.clf_tasks, random_state=2**32), ValueError,
         r"random_state must be .*got 4294967296"),
    case("random_state=True", lambda c: fit(c.clf_tasks, random_state=True), ValueError,
         r"random_state must be .*got True"),
]


@pytest.mark.parametrize("call, error, match", ESTIMATOR)
def test_bad_estimator_parameters(call, error, match, ctx):
    check(call, error, match, ctx)


def test_random_state_takes_what_check_random_state_takes(ctx):
    """A NumPy integer or RandomState seeds meta_fit like the plain int."""
    expected = fit(ctx.clf_tasks, random_state=3).params_
    for seed in (np.int64(3), np.random.RandomState(3)):
        assert_close(fit(ctx.clf_tasks, random_state=seed).params_, expected)
    fit(ctx.clf_tasks, random_state=None)


# --------------------------------------------------------------------------------------------------
# What meta_fit is given: not a sampler, or a sampler whose tasks are wrong

SAMPLERS = [
    case("a list", lambda c: fit([1, 2, 3]),
         TypeError, r"meta_fit expects a fewshot.tasks.TaskSampler.*got list"),
    case("the class, not an instance", lambda c: fit(SinusoidTasks), TypeError, r"TaskSampler.*got type"),
    case("a Task", lambda c: fit(c.task), TypeError, r"TaskSampler.*got Task"),
    case("None", lambda c: fit(None), TypeError, r"TaskSampler.*got NoneType"),
    case("sample returns a list", lambda c: fit(Edited(lambda b: [b])), TypeError,
         r"Edited.sample\(n_tasks\) must return a TaskBatch, got list"),
    case("float labels", lambda c: fit(edit_support(lambda x, y: (x, y.float()))), TypeError,
         r"sampled tasks: support.y must hold integer class labels"),
    case("NaN inputs", lambda c: fit(edit_support(lambda x, y: (x * math.nan, y))), ValueError,
         r"sampled tasks: support.x contains NaN"),
    case("labels 1..3", lambda c: fit(edit_support(lambda x, y: (x, y + 1))), ValueError,
         r"sampled tasks: support.y labels must lie in 0..2 \(n_way=3\), got labels in 1..3"),
    case("a missing class", lambda c: fit(edit_support(lambda x, y: (x, y.clamp(max=1)))), ValueError,
         r"sampled tasks: support.y \(task 0\) is missing class\(es\) \[2\]"),
    case("wrong input shape", lambda c: fit(edit_support(lambda x, y: (x[..., :3], y))), ValueError,
         r"sampled tasks: support.x must have shape \[n_tasks, n, 4\], got \[2, 6, 3\]"),
    case("uint8 inputs", lambda c: fit(edit_support(lambda x, y: (x.to(torch.uint8), y))), TypeError,
         r"support.x must hold floating-point inputs, got dtype torch.uint8"),
    case("query of other task count",
         lambda c: fit(Edited(lambda b: TaskBatch(b.support, LabeledSet(b.query.x[:1], b.query.y[:1])))),
         ValueError, r"TaskBatch.support and TaskBatch.query must hold the same number of tasks, "
                     r"got 2 and 1"),
    case("Reptile inner_shots on regression",
         lambda c: fit(c.reg_tasks, fewshot.Reptile, inner_shots=1), ValueError,
         r"inner_shots batches the inner loop by class"),
    case("FineTune without pre-training data",
         lambda c: fewshot.FineTune(meta_steps=1).meta_fit(Edited(lambda b: b)), TypeError,
         r"FineTune needs pooled pre-training data, which Edited"),
    case("n_outputs=0", lambda c: fit(Edited(lambda b: b, n_outputs=0, n_way=0)), ValueError,
         r"Edited.n_outputs must be >= 1, got 0"),
    case("n_outputs=2.0", lambda c: fit(Edited(lambda b: b, n_outputs=2.0)), ValueError,
         r"Edited.n_outputs must be an integer, got 2.0"),
    case("task_type='ranking'", lambda c: fit(Edited(lambda b: b, task_type="ranking")), ValueError,
         r"Edited.task_type must be one of \['classification', 'regression'\], got 'ranking'"),
    case("input_shape=(0,)", lambda c: fit(Edited(lambda b: b, input_shape=(0,))), ValueError,
         r"Edited.input_shape must be a tuple of positive integers, got \(0,\)"),
    case("input_shape=4", lambda c: fit(Edited(lambda b: b, input_shape=4)), ValueError,
         r"Edited.input_shape must be a tuple of positive integers, got 4"),
]


@pytest.mark.parametrize("call, error, match", SAMPLERS)
def test_bad_samplers(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# adapt(support)


def adapt(c, x=None, y=None):
    return c.clf.adapt((c.x if x is None else x, c.y if y is None else y))


def adapt_reg(c, x=None, y=None):
    return c.reg.adapt((c.xr if x is None else x, c.yr if y is None else y))


SUPPORT = [
    case("5 features for 4", lambda c: adapt(c, x=torch.randn(6, 5)), ValueError,
         r"support.x must have shape \[n, 4\], got \[6, 5\]"),
    case("one example without batch axis", lambda c: c.clf.adapt((c.x[0], c.y[:1])), ValueError,
         r"support.x must have shape \[n, 4\], got \[4\]; for a single example pass support.x\[None\]"),
    case("NaN x", lambda c: adapt(c, x=torch.full((6, 4), math.nan)), ValueError, r"support.x contains NaN"),
    case("inf x", lambda c: adapt(c, x=c.x.clone().index_fill_(0, torch.tensor([2]), math.inf)), ValueError,
         r"support.x contains NaN or infinite"),
    case("label 3 in 3-way", lambda c: adapt(c, y=torch.tensor([0, 0, 1, 1, 2, 3])), ValueError,
         r"support.y labels must lie in 0..2 \(n_way=3\), got labels in 0..3"),
    case("negative labels", lambda c: adapt(c, y=torch.tensor([-1, 0, 1, 1, 2, 2])), ValueError,
         r"support.y labels must lie in 0..2.*got labels in -1..2"),
    case("5-way labels for a 3-way model", lambda c: c.clf.adapt((torch.randn(5, 4), torch.arange(5))),
         ValueError, r"support.y labels must lie in 0..2 \(n_way=3\), got labels in 0..4"),
    case("missing class", lambda c: adapt(c, y=torch.tensor([0, 0, 1, 1, 1, 0])), ValueError,
         r"support.y is missing class\(es\) \[2\]: every one of the n_way=3 classes"),
    case("float labels", lambda c: adapt(c, y=c.y.float()), TypeError,
         r"support.y must hold integer class labels 0..2, got dtype torch.float32"),
    case("float64 numpy labels", lambda c: adapt(c, y=c.y.numpy().astype(np.float64)), TypeError,
         r"support.y must hold integer class labels 0..2, got dtype torch.float64"),
    case("bool labels", lambda c: adapt(c, y=c.y > 0),
         TypeError, r"support.y must hold integer class labels"),
    case("uint8 images", lambda c: adapt(c, x=(c.x.abs() * 100).to(torch.uint8)), TypeError,
         r"support.x must hold floating-point inputs, got dtype torch.uint8: convert .* float32 in \[0, 1\]"),
    case("numpy int64 x", lambda c: adapt(c, x=np.ones((6, 4), dtype=np.int64)), TypeError,
         r"support.x must hold floating-point inputs, got dtype torch.int64"),
    case("5 labels for 6 examples", lambda c: adapt(c, y=c.y[:5]), ValueError,
         r"support.y must have shape \[6\] \(one label per example of support.x\), got \[5\]"),
    case("labels as a column", lambda c: adapt(c, y=c.y[:, None]), ValueError,
         r"support.y must have shape \[6\] .*got \[6, 1\]"),
    case("empty support", lambda c: adapt(c, x=c.x[:0], y=c.y[:0]), ValueError, r"support.x is empty"),
    case("x alone", lambda c: c.clf.adapt(c.x), TypeError,
         r"support must be a LabeledSet or an \(x, y\) pair of arrays, got Tensor"),
    case("a whole Task", lambda c: c.clf.adapt(c.task), TypeError,
         r"support must be a LabeledSet .*got Task \(a task's support set is support=task.support\)"),
    case("a triple", lambda c: c.clf.adapt((c.x, c.y, c.y)), TypeError, r"got a tuple of length 3"),
    case("None", lambda c: c.clf.adapt(None), TypeError, r"support must be a LabeledSet .*got NoneType"),
    case("y None", lambda c: c.clf.adapt((c.x, None)), TypeError,
         r"support.y must be a torch.Tensor or an array of numbers .*got NoneType"),
    case("string array x", lambda c: adapt(c, x=np.full((6, 4), "a")), TypeError,
         r"support.x must be a torch.Tensor or an array .*got numpy.ndarray of dtype <U1"),
    case("ragged list x", lambda c: adapt(c, x=[[0.0] * 4] * 5 + [[0.0] * 3]), TypeError,
         r"support.x must be a torch.Tensor or an array .*got list"),
    case("object array y", lambda c: adapt(c, y=np.array([0, 0, 1, 1, 2, None], dtype=object)), TypeError,
         r"support.y must be .*got numpy.ndarray of dtype object"),
    case("regression: 3 outputs for 1", lambda c: adapt_reg(c, y=torch.randn(4, 3)), ValueError,
         r"support.y must have shape \[4, 1\] or \[4\] \(one target per example of support.x\), "
         r"got \[4, 3\]"),
    case("regression: integer targets", lambda c: adapt_reg(c, y=torch.ones(4, dtype=torch.long)), TypeError,
         r"support.y must hold floating-point regression targets, got dtype torch.int64"),
    case("regression: NaN targets", lambda c: adapt_reg(c, y=torch.full((4, 1), math.nan)), ValueError,
         r"support.y contains NaN"),
    case("regression: 3 targets for 4 inputs", lambda c: adapt_reg(c, y=c.yr[:3]), ValueError,
         r"support.y must have shape \[4, 1\] or \[4\] .*got \[3, 1\]"),
    case("regression: targets [n, 1, 1]", lambda c: adapt_reg(c, y=c.yr[..., None]), ValueError,
         r"support.y must have shape \[4, 1\] or \[4\] .*got \[4, 1, 1\]"),
    case("regression: x without feature axis", lambda c: adapt_reg(c, x=c.xr[:, 0]), ValueError,
         r"support.x must have shape \[n, 1\], got \[4\]; "
         r"for n scalar inputs pass support.x.reshape\(-1, 1\)"),
]


@pytest.mark.parametrize("call, error, match", SUPPORT)
def test_bad_support_sets(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# AdaptedModel: predict, predict_proba, forward, score

PREDICT = [
    case("predict: 2 features for 4", lambda c: c.adapted.predict(torch.randn(3, 2)), ValueError,
         r"x must have shape \[n, 4\], got \[3, 2\]"),
    case("predict: one example without batch axis", lambda c: c.adapted.predict(c.xq[0]), ValueError,
         r"x must have shape \[n, 4\], got \[4\]; for a single example pass x\[None\]"),
    case("predict: integer x", lambda c: c.adapted.predict(c.xq.long()), TypeError,
         r"x must hold floating-point inputs, got dtype torch.int64"),
    case("predict: NaN x", lambda c: c.adapted.predict(c.xq * math.nan), ValueError, r"x contains NaN"),
    case("predict: empty x", lambda c: c.adapted.predict(c.xq[:0]), ValueError, r"x is empty"),
    case("predict: a string", lambda c: c.adapted.predict("abc"), TypeError,
         r"x must be a torch.Tensor or an array of numbers .*got str"),
    case("predict: None", lambda c: c.adapted.predict(None), TypeError, r"x must be .*got NoneType"),
    case("predict_proba: NaN x", lambda c: c.adapted.predict_proba(c.xq * math.nan), ValueError,
         r"x contains NaN"),
    case("predict_proba: regression", lambda c: c.adapted_reg.predict_proba(c.xrq), AttributeError,
         r"predict_proba is only available for classification"),
    case("forward: ragged list", lambda c: c.adapted.forward([[0.0, 1.0, 2.0, 3.0], [0.0]]), TypeError,
         r"x must be a torch.Tensor or an array .*got list"),
    case("score: 2 labels for 3 examples", lambda c: c.adapted.score(c.xq, torch.tensor([0, 1])), ValueError,
         r"y must have shape \[3\] \(one label per example of x\), got \[2\]"),
    case("score: label 9 in 3-way", lambda c: c.adapted.score(c.xq, torch.tensor([0, 1, 9])), ValueError,
         r"y labels must lie in 0..2 \(n_way=3\), got labels in 0..9"),
    case("score: negative label", lambda c: c.adapted.score(c.xq, torch.tensor([-3, 1, 2])), ValueError,
         r"y labels must lie in 0..2 .*got labels in -3..2"),
    case("score: float labels", lambda c: c.adapted.score(c.xq, torch.tensor([0.0, 1.0, 2.0])), TypeError,
         r"y must hold integer class labels"),
    case("score: numpy float labels", lambda c: c.adapted.score(c.xq, np.array([0.0, 1.0, 2.0])), TypeError,
         r"y must hold integer class labels 0..2, got dtype torch.float64"),
    case("score: labels as a column", lambda c: c.adapted.score(c.xq, c.yq[:, None]), ValueError,
         r"y must have shape \[3\] .*got \[3, 1\]"),
    case("score: y None", lambda c: c.adapted.score(c.xq, None), TypeError, r"y must be .*got NoneType"),
    case("score: y a string", lambda c: c.adapted.score(c.xq, "012"), TypeError, r"y must be .*got str"),
    case("score: bad x", lambda c: c.adapted.score(torch.randn(3, 5), c.yq), ValueError,
         r"x must have shape \[n, 4\], got \[3, 5\]"),
    case("regression score: 2 targets for 3", lambda c: c.adapted_reg.score(c.xrq, c.yrq[:2]), ValueError,
         r"y must have shape \[3, 1\] or \[3\] \(one target per example of x\), got \[2, 1\]"),
    case("regression score: NaN targets", lambda c: c.adapted_reg.score(c.xrq, c.yrq * math.nan), ValueError,
         r"y contains NaN"),
    case("regression score: integer targets", lambda c: c.adapted_reg.score(c.xrq, torch.ones(3, dtype=int)),
         TypeError, r"y must hold floating-point regression targets"),
    case("regression score: 2 outputs for 1", lambda c: c.adapted_reg.score(c.xrq, torch.randn(3, 2)),
         ValueError, r"y must have shape \[3, 1\] or \[3\] .*got \[3, 2\]"),
]


@pytest.mark.parametrize("call, error, match", PREDICT)
def test_bad_predict_and_score_inputs(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# evaluate / score over tasks, and unfitted estimators

EVALUATE = [
    case("tasks None", lambda c: c.clf.evaluate(None), TypeError, r"expected a TaskSampler.*got NoneType"),
    case("tasks []", lambda c: c.clf.evaluate([]), TypeError, r"got an empty list"),
    case("tasks [1, 2]", lambda c: c.clf.evaluate([1, 2]),
         TypeError, r"got a list whose item 0 is of type int"),
    case("n_tasks=0", lambda c: c.clf.evaluate(c.clf_tasks, n_tasks=0), ValueError, r"n_tasks must be >= 1"),
    case("n_tasks='5'", lambda c: c.clf.evaluate(c.clf_tasks, n_tasks="5"), ValueError,
         r"n_tasks must be an integer"),
    case("n_tasks=2.5", lambda c: c.clf.evaluate(c.clf_tasks, n_tasks=2.5), ValueError,
         r"n_tasks must be an integer"),
    case("random_state='a'", lambda c: c.clf.evaluate(c.clf_tasks, n_tasks=2, random_state="a"), TypeError,
         r"random_state must be None, an int, .*got str"),
    case("random_state=-1", lambda c: c.clf.evaluate(c.clf_tasks, n_tasks=2, random_state=-1), ValueError,
         r"random_state must be a non-negative integer"),
    case("regression tasks for a classifier", lambda c: c.clf.evaluate(c.reg_tasks, n_tasks=2), ValueError,
         r"tasks: support.x must have shape \[n_tasks, n, 4\], got \[2, 4, 1\]"),
    case("5-way tasks for a 3-way model",
         lambda c: c.clf.evaluate(GaussianClusterTasks(n_way=5, n_features=4), n_tasks=2), ValueError,
         r"tasks: support.y labels must lie in 0..2"),
    case("score(sampler, n_tasks=0)", lambda c: c.clf.score(c.clf_tasks, n_tasks=0), ValueError,
         r"n_tasks must be >= 1"),
    case("unfitted adapt", lambda c: fewshot.MAML().adapt((c.x, c.y)), NotFittedError, r"not fitted yet"),
    case("unfitted evaluate", lambda c: fewshot.FOMAML().evaluate(c.clf_tasks), NotFittedError,
         r"not fitted yet.*meta_fit"),
]


@pytest.mark.parametrize("call, error, match", EVALUATE)
def test_bad_evaluation_inputs(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# Task samplers

TASK_SAMPLERS = [
    case("SinusoidTasks k_shot=0", lambda c: SinusoidTasks(k_shot=0),
         ValueError, r"k_shot must be an integer >= 1"),
    case("SinusoidTasks k_shot=1.5", lambda c: SinusoidTasks(k_shot=1.5),
         ValueError, r"k_shot must be an integer"),
    case("SinusoidTasks n_query=0", lambda c: SinusoidTasks(n_query=0), ValueError, r"n_query must be"),
    case("SinusoidTasks amplitude=(5, 1)", lambda c: SinusoidTasks(amplitude=(5, 1)), ValueError,
         r"amplitude must be finite with low <= high"),
    case("SinusoidTasks amplitude=3", lambda c: SinusoidTasks(amplitude=3), ValueError,
         r"amplitude must be a \(low, high\) pair"),
    case("SinusoidTasks noise=-1", lambda c: SinusoidTasks(noise=-1), ValueError,
         r"noise must be a non-negative number"),
    case("SinusoidTasks noise=nan", lambda c: SinusoidTasks(noise=math.nan), ValueError, r"noise must be"),
    case("GaussianClusterTasks n_way=1", lambda c: GaussianClusterTasks(n_way=1), ValueError,
         r"n_way must be an integer >= 2"),
    case("GaussianClusterTasks n_way > n_classes", lambda c: GaussianClusterTasks(n_way=10, n_classes=5),
         ValueError, r"n_way=10 is larger than the n_classes=5"),
    case("GaussianClusterTasks k_shot=0", lambda c: GaussianClusterTasks(k_shot=0),
         ValueError, r"k_shot must be"),
    case("GaussianClusterTasks n_query=-1", lambda c: GaussianClusterTasks(n_query=-1), ValueError,
         r"n_query must be"),
    case("GaussianClusterTasks n_features=0", lambda c: GaussianClusterTasks(n_features=0), ValueError,
         r"n_features must be"),
    case("LinearRegressionTasks n_features=0", lambda c: LinearRegressionTasks(n_features=0), ValueError,
         r"n_features must be"),
    case("LinearRegressionTasks noise=-1", lambda c: LinearRegressionTasks(noise=-1), ValueError,
         r"noise must be a non-negative number"),
    case("sample n_tasks=0", lambda c: c.reg_tasks.sample(0), ValueError,
         r"n_tasks must be a positive integer or None"),
    case("sample n_tasks=2.5", lambda c: c.reg_tasks.sample(2.5),
         ValueError, r"n_tasks must be a positive integer"),
    case("sample random_state='a'", lambda c: c.reg_tasks.sample(2, random_state="a"), TypeError,
         r"random_state must be None, an int"),
    case("sample random_state=1.5", lambda c: c.reg_tasks.sample(2, random_state=1.5), TypeError,
         r"random_state must be .*got float"),
    case("sample random_state=-1", lambda c: c.reg_tasks.sample(2, random_state=-1), ValueError,
         r"random_state must be a non-negative integer"),
    case("GaussianClusterTasks noise=-1", lambda c: GaussianClusterTasks(noise=-1), ValueError,
         r"noise must be a non-negative number, got -1"),
    case("GaussianClusterTasks noise='a'", lambda c: GaussianClusterTasks(noise="a"), ValueError,
         r"noise must be a non-negative number, got 'a'"),
    case("GaussianClusterTasks seed='a'", lambda c: GaussianClusterTasks(seed="a"), ValueError,
         r"seed must be an integer >= 0, got 'a'"),
    case("GaussianClusterTasks seed=1.5", lambda c: GaussianClusterTasks(seed=1.5), ValueError,
         r"seed must be an integer >= 0, got 1.5"),
    case("GaussianClusterTasks seed=-1", lambda c: GaussianClusterTasks(seed=-1), ValueError,
         r"seed must be an integer >= 0, got -1"),
    case("LinearRegressionTasks w_mean='a'", lambda c: LinearRegressionTasks(w_mean="a"), ValueError,
         r"w_mean must be a number, got 'a'"),
    case("LinearRegressionTasks w_mean=nan", lambda c: LinearRegressionTasks(w_mean=math.nan), ValueError,
         r"w_mean must be finite, got nan"),
    case("LinearRegressionTasks w_std=inf", lambda c: LinearRegressionTasks(w_std=math.inf), ValueError,
         r"w_std must be finite, got inf"),
    case("SinusoidTasks noise=inf", lambda c: SinusoidTasks(noise=math.inf), ValueError,
         r"noise must be finite, got inf"),
]


@pytest.mark.parametrize("call, error, match", TASK_SAMPLERS)
def test_bad_task_sampler_arguments(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# Task containers

CONTAINERS = [
    case("LabeledSet 6 examples, 5 labels", lambda c: LabeledSet(c.x, c.y[:5]), ValueError,
         r"LabeledSet.x and LabeledSet.y must have the same length along the first axis.*\[6, 4\] and \[5\]"),
    case("LabeledSet of strings", lambda c: LabeledSet("a", "b"), TypeError,
         r"LabeledSet.x must be a torch.Tensor or an array of numbers .*got str"),
    case("LabeledSet of scalars", lambda c: LabeledSet(torch.tensor(1.0), torch.tensor(1)), ValueError,
         r"LabeledSet.x and LabeledSet.y must have the same length.*\[\] and \[\]"),
    case("Task of ints", lambda c: Task(1, 2),
         TypeError, r"Task.support must be a LabeledSet or an \(x, y\) pair"),
    case("Task with a triple", lambda c: Task(c.task.support, (c.x, c.y, c.y)), TypeError,
         r"Task.query must be a LabeledSet .*got tuple"),
    case("Task pair of other lengths", lambda c: Task((c.x, c.y[:4]), c.task.query), ValueError,
         r"Task.support.x and Task.support.y must have the same length"),
    case("TaskBatch of 2 and 3 tasks",
         lambda c: TaskBatch(LabeledSet(torch.randn(2, 6, 4), torch.zeros(2, 6)),
                             LabeledSet(torch.randn(3, 6, 4), torch.zeros(3, 6))),
         ValueError, r"TaskBatch.support and TaskBatch.query must hold the same number of tasks, "
                     r"got 2 and 3"),
    case("TaskBatch of one task's sets", lambda c: TaskBatch(c.task.support, c.task.query), ValueError,
         r"TaskBatch.support.x and TaskBatch.support.y must have shapes \[n_tasks, n, ...\].*is a Task"),
    case("TaskBatch.stack([])", lambda c: TaskBatch.stack([]), ValueError, r"needs at least one task"),
    case("TaskBatch.stack of unequal tasks",
         lambda c: TaskBatch.stack([c.task, GaussianClusterTasks(n_way=3, n_features=5).sample()]),
         ValueError, r"TaskBatch.stack needs tasks of equal shapes.* of task 1 are \[\[3, 5\]"),
    case("TaskBatch.stack of non-tasks", lambda c: TaskBatch.stack([c.task, 1]), TypeError,
         r"TaskBatch.stack needs Task objects, got int at position 1"),
    case("as_task_batch of a string", lambda c: as_task_batch("abc"), TypeError, r"got str"),
]


@pytest.mark.parametrize("call, error, match", CONTAINERS)
def test_bad_task_containers(call, error, match, ctx):
    check(call, error, match, ctx)


# --------------------------------------------------------------------------------------------------
# NumPy (and lists) are taken wherever tensors are


def test_numpy_support_and_queries_predict_like_tensors(ctx):
    from_tensors = ctx.clf.adapt((ctx.x, ctx.y))
    from_numpy = ctx.clf.adapt((ctx.x.numpy().astype(np.float64), ctx.y.numpy().astype(np.int32)))
    for method in ("forward", "predict", "predict_proba"):
        expected = getattr(from_tensors, method)(ctx.xq)
        assert_close(getattr(from_numpy, method)(ctx.xq.numpy()), expected)
        assert_close(getattr(from_tensors, method)(ctx.xq.tolist()), expected)
    assert from_numpy.predict(ctx.xq.numpy()).dtype == torch.int64
    assert from_numpy.forward(ctx.xq.numpy().astype(np.float64)).dtype == torch.float32  # estimator's dtype
    expected = from_tensors.score(ctx.xq, ctx.yq)
    assert from_numpy.score(ctx.xq.numpy(), ctx.yq.numpy().astype(np.uint8)) == expected


def test_numpy_regression_targets(ctx):
    from_tensors = ctx.reg.adapt((ctx.xr, ctx.yr))
    from_numpy = ctx.reg.adapt(LabeledSet(ctx.xr.double().numpy(), ctx.yr[:, 0].double().numpy()))  # y [n]
    assert_close(from_numpy.predict(ctx.xrq.numpy()), from_tensors.predict(ctx.xrq))
    expected = from_tensors.score(ctx.xrq, ctx.yrq)
    assert from_numpy.score(ctx.xrq.numpy(), ctx.yrq.numpy()) == pytest.approx(expected)
    assert from_numpy.score(ctx.xrq.numpy(), ctx.yrq[:, 0].numpy()) == pytest.approx(expected)


def test_labeled_set_converts_numpy_and_keeps_tensors(ctx):
    s = LabeledSet(ctx.x.numpy(), ctx.y.numpy())
    assert isinstance(s.x, torch.Tensor) and isinstance(s.y, torch.Tensor)
    assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64 and len(s) == 6
    assert_close(s.x, ctx.x)
    kept = LabeledSet(ctx.x, ctx.y)
    assert kept.x is ctx.x and kept.y is ctx.y  # a tensor is not copied
    s = LabeledSet(np.ones((3, 2)), [0, 1, 0])
    assert s.x.dtype == torch.float64 and s.y.dtype == torch.int64


def test_read_only_and_reversed_numpy_arrays(ctx):
    x = ctx.x.numpy().copy()
    x.flags.writeable = False
    expected = ctx.adapted.predict(ctx.x.flip(0))
    assert_close(ctx.adapted.predict(x[::-1]), expected)
    assert_close(ctx.clf.adapt((x, ctx.y.numpy())).predict(ctx.xq), ctx.adapted.predict(ctx.xq))


def test_tasks_from_numpy_evaluate_like_tensors(ctx):
    t = ctx.task
    as_numpy = Task((t.support.x.numpy(), t.support.y.numpy()), (t.query.x.numpy(), t.query.y.numpy()))
    assert ctx.clf.evaluate(as_numpy).mean == ctx.clf.evaluate(t).mean
    batch = ctx.clf_tasks.sample(3, random_state=1)
    numpy_batch = TaskBatch((batch.support.x.numpy(), batch.support.y.numpy()),
                            (batch.query.x.numpy(), batch.query.y.numpy()))
    assert len(numpy_batch) == 3
    assert_close(ctx.clf.evaluate(numpy_batch).scores, ctx.clf.evaluate(batch).scores)


def test_score_validation_matches_evaluate(ctx):
    batch = ctx.clf_tasks.sample(2, random_state=3)
    scores = [ctx.clf.adapt(t.support).score(t.query.x, t.query.y) for t in batch]
    assert_close(ctx.clf.evaluate(batch).scores, np.asarray(scores))


# --------------------------------------------------------------------------------------------------
# AdaptedModel's repr, and optional dependencies


def test_adapted_model_repr(ctx):
    device = ctx.adapted.device  # device="auto": the CPU, or CUDA where there is one
    assert repr(ctx.adapted) == ("AdaptedModel(task_type='classification', n_way=3, input_shape=(4,), "
                                 f"support=6 examples, transductive=True, device={device}, dtype=float32)")
    assert repr(ctx.adapted_reg) == ("AdaptedModel(task_type='regression', n_outputs=1, input_shape=(1,), "
                                     f"support=4 examples, transductive=True, device={device}, dtype=float32)")


def test_missing_pillow_says_what_to_install(monkeypatch):
    from fewshot.datasets import _omniglot

    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(ImportError, match=r'needs Pillow.*pip install "fewshot\[datasets\]"'):
        _omniglot._decode([], 28)
