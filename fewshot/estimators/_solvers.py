"""The six meta-gradient solvers as scikit-learn estimators.

Each class only declares its hyperparameters and picks its meta-gradient rule
(:mod:`fewshot._metagrad`); the training loop, adaptation and scoring are shared
(:class:`fewshot._base.MetaLearner`).
"""

from __future__ import annotations

import functools
import inspect

from ..core import linalg
from ..core.rules import FirstOrder, Implicit, ReptileRule, Unrolled, penalty_objective
from .._validation import check_choice, check_number
from ._base import MetaLearner
from ._params import COMMON_PARAMS, estimator_init

__all__ = ["MAML", "FOMAML", "Reptile", "IMAML", "NeumannMAML", "PenaltyMAML"]

_COMMON_DOC = """
    model : "auto", "conv4", "mlp" or nn.Module, default="auto"
        The network. A module is used as a template (its current weights are the initial
        meta-parameters) and is never modified. "auto" picks "conv4" for image inputs
        ``[C, H, W]`` and "mlp" otherwise.
    loss : "auto", "cross_entropy", "mse" or callable, default="auto"
        ``loss(outputs, targets) -> scalar``. "auto": cross-entropy for classification samplers,
        mean squared error for regression.
    inner_lr : float or "auto", default="auto"
        Inner step size alpha. "auto": 0.4 for classification (MAML's Omniglot value), 0.01 for
        regression (MAML's sinusoid value); the resolved value is ``inner_lr_``.
    inner_steps : int, default=5
        Inner gradient steps k during meta-training.
    adapt_steps : int or None, default=None
        Inner steps used by ``adapt``/``score``; ``None`` uses ``inner_steps``.
    meta_lr : float, default=1e-3
        Learning rate of the meta-optimizer.
    meta_batch_size : int, default=16
        Tasks per meta-step.
    meta_steps : int, default=2000
        Meta-steps per call to ``meta_fit``.
    meta_optimizer : "adam", "adamw", "sgd" or torch.optim.Optimizer subclass, default="adam"
    meta_lr_schedule : "constant", "linear" or "cosine", default="constant"
        The meta learning rate at meta-step ``t`` (0-based, counted over all fits) of ``T``:
        ``meta_lr`` times 1, ``1 - t/T`` (linear annealing to zero, as Reptile) or
        ``(1 + cos(pi t/T))/2``. A function of ``t`` only, so a resumed run follows it exactly.
    meta_lr_horizon : int or None, default=None
        ``T`` of the schedule (factor 0 from then on). ``None``: the fit's last step, ``meta_steps``
        with a checkpoint and ``n_iter_ + meta_steps`` otherwise; set it when training in several
        warm-started fits (``fewshot compare`` sets it to the run's meta-steps).
    grad_clip : float or None, default=None
        Rescale the mean meta-gradient to at most this norm.
    transductive : bool, default=True
        How ``adapt(...).predict`` normalises batch-norm layers: with the statistics of the
        predicted batch (True, as published Omniglot results do) or per example together with the
        support set (False).
    device : "auto" or torch device, default="auto"
        "auto" uses CUDA when available.
    dtype : "float32" or "float64", default="float32"
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights of named models and the task stream.
    verbose : "auto" or int, default="auto"
        Progress bar (tqdm, with ETA) over the meta-steps. "auto": shown when a person is watching
        (standard error is a terminal, or a Jupyter kernel runs the fit) and only once the fit has
        run for two seconds; silent under pytest, in pipes, log files and batch jobs. 0: never;
        > 0: always, from the first step.
    warm_start : bool, default=False
        Continue from the fitted meta-parameters and optimizer state on the next ``meta_fit``.
    full_history : bool, default=True
        Record all four curves of ``history_`` every meta-step. The support loss before adaptation
        and the query loss after it come free with the meta-gradient; the query loss before and
        the support loss after adaptation cost one more forward pass each per task (measured cost:
        ``docs/benchmarks.md``, "Implementation choices"). False records only the free ones.
    task_threads : int or "auto", default="auto"
        Python threads that process the tasks of a meta-batch in parallel, each with one intra-op
        thread. "auto": ``torch.get_num_threads()`` on CPU (tasks are many small operations, which
        intra-op threading parallelises poorly) when a forward pass of one example costs at least
        1 MFLOP (the Omniglot Conv4: 20 MFLOP), and 1 for smaller networks (the sinusoid MLP:
        3 kFLOP; there Python overhead dominates and threads contend for the interpreter) and on
        CUDA. The result does not depend on it beyond floating-point summation order within kernels.
        Each thread holds one task's graph, so peak memory grows with the number of threads; use 1
        when memory binds (measured peaks and times: ``docs/benchmarks.md``, "Peak memory and the
        allocator"). Not used when the meta-step runs its tasks batched: for networks under 1 MFLOP
        per example built of ``Linear``, ``ReLU`` and ``Flatten`` layers only
        (:class:`~fewshot.models.MLP`), MAML, FOMAML, PenaltyMAML and Reptile
        (``inner_data="support"``, ``inner_shots=None``) compute all tasks of a meta-batch at once,
        with a leading task axis on the parameters (batched matrix products). The result is the
        same up to floating-point summation order (tested); the implicit solvers, whose linear
        solves take inner products per task, run task by task.
    inner_params : None, str, list of str or callable, default=None
        The parameters the inner loop adapts; the others keep their meta-learned values in every
        inner step and are learned by the outer loop alone. None: all. A parameter or module name,
        or a list of them (a module name selects its parameters); ``"head"`` is the module called
        ``head`` if the network has one, else its last ``nn.Linear`` layer (ANIL's choice). Or a
        predicate ``name -> bool``. The meta-gradient is still with respect to every
        meta-parameter (see the class's description for what it is with a subset). When every
        adapted parameter lies after the others in a network fewshot runs layer by layer (Conv4,
        MLP, ``nn.Sequential``), the layers before them run once per task instead of once per step.
"""

_ATTRIBUTES_DOC = """
    Attributes
    ----------
    params_ : dict of str to Tensor
        Meta-parameters theta: the network's parameters under their module names, and learned
        inner learning rates (estimators that learn them) under ``"inner_lr.<parameter name>"``.
    inner_ : fewshot.core.InnerProblem
        The inner problem of meta-training and of ``adapt`` (adapted parameters resolved).
    n_iter_ : int
        Meta-steps run.
    history_ : dict of str to list of float
        Per meta-step means over the meta-batch: ``support_loss_pre``, ``query_loss_pre`` (at theta),
        ``support_loss_post``, ``query_loss_post`` (after adaptation), the same with ``acc`` for
        classification, ``meta_grad_norm`` and cumulative wall ``time`` in seconds.
    inner_lr_, loss_, task_type_, input_shape_, n_outputs_ : resolved settings.
"""


def _doc(cls):
    """Fill the shared parameter and attribute sections in, with the class's own default of
    ``inner_steps`` (the implicit solvers take more steps)."""
    signature = inspect.signature(cls).parameters
    common = _COMMON_DOC.replace("inner_steps : int, default=5",
                                 f"inner_steps : int, default={signature['inner_steps'].default}")
    if "inner_params" not in signature:
        common = common[:common.index("    inner_params :")]
    elif signature["inner_params"].default is not None:
        common = common.replace("inner_params : None, str, list of str or callable, default=None",
                                "inner_params : None, str, list of str or callable, "
                                f"default={signature['inner_params'].default!r}")
    cls.__doc__ = cls.__doc__.replace("{common}", common).replace("{attributes}", _ATTRIBUTES_DOC)
    return cls


#: Reptile's parameters: it moves theta towards the adapted parameters, so it adapts all of them.
_WITHOUT_SUBSET = {k: v for k, v in COMMON_PARAMS.items() if k != "inner_params"}

_positive = functools.partial(check_number, low=0, low_open=True)
_step_size = functools.partial(check_number, low=0, low_open=True, high=1e6)
_non_negative = functools.partial(check_number, low=0)
_count = functools.partial(check_number, low=1, integer=True)


@_doc
class MAML(MetaLearner):
    """Model-agnostic meta-learning with the exact (second-order) meta-gradient.

    Per task, with support loss Ls, query loss Lq and inner step size alpha:
    ``phi_0 = theta``, ``phi_{j+1} = phi_j - alpha * grad Ls(phi_j)`` for ``j < k``; the
    meta-gradient is the total derivative ``d Lq(phi_k) / d theta`` through all k steps,
    ``prod_{j=k-1..0} (I - alpha H_j) grad Lq(phi_k)`` with ``H_j = grad^2 Ls(phi_j)``
    (Finn et al., 2017). The meta-update averages it over the meta-batch.

    Parameters
    ----------
    {common}
    memory_efficient : bool, default=False
        False: backpropagate through the unrolled inner loop (activation memory grows linearly
        with ``inner_steps``). True: run the inner loop without a graph, keep only the iterates
        and apply the chain rule backwards with one Hessian-vector product per step: the same
        gradient, activation memory independent of ``inner_steps``, for roughly one extra forward
        and backward pass per inner step.
    {attributes}
    Notes
    -----
    On Omniglot 5-way 1-shot ``fewshot compare`` (protocol ``tuned``) uses the report's Table 1
    inner loop: 5 steps of ``alpha = 0.01`` in meta-training and at test, Adam at 1e-3, 15 query
    examples per class in meta-training. Its results, those of the class default ``alpha = 0.4``,
    and why so small a step adapts there, are in ``docs/results.md``.

    References
    ----------
    Finn, Abbeel, Levine. Model-agnostic meta-learning for fast adaptation of deep networks.
    ICML 2017.

    Examples
    --------
    >>> import fewshot
    >>> sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    >>> learner = fewshot.MAML(inner_steps=1, meta_steps=5, random_state=0).meta_fit(sampler)
    >>> task = sampler.sample(random_state=1)
    >>> learner.adapt(task.support).predict(task.query.x).shape
    torch.Size([10, 1])
    """

    __init__ = estimator_init(**COMMON_PARAMS, memory_efficient=False)
    _extra_checks = {"memory_efficient": lambda n, v: check_choice(n, str(v), {"True", "False"})}

    def _make_rule(self):
        return Unrolled(self.inner_, memory_efficient=bool(self.memory_efficient), full_stats=self.full_history)


@_doc
class FOMAML(MetaLearner):
    """First-order MAML.

    Same inner loop as :class:`MAML` (``phi_{j+1} = phi_j - alpha * grad Ls(phi_j)`` from
    ``phi_0 = theta``); the meta-gradient is ``grad Lq(phi_k)``, the query gradient at the adapted
    parameters with ``phi_k`` treated as a constant (the Hessian terms of MAML dropped).

    Parameters
    ----------
    {common}
    {attributes}
    Notes
    -----
    On Omniglot ``fewshot compare`` uses the report's inner loop (5 steps of 0.01 in meta-training
    and at test, 15 training queries per class) with Adam from 5e-3 annealed linearly to zero
    (``meta_lr=5e-3``, ``meta_lr_schedule="linear"``). Its results, and how close its meta-gradient
    is to MAML's (:func:`fewshot.diagnostics.meta_gradient_fidelity`), are in ``docs/results.md``.

    References
    ----------
    Finn, Abbeel, Levine. ICML 2017, section 5.2; Nichol, Achiam, Schulman. On first-order
    meta-learning algorithms. arXiv:1803.02999, 2018.
    """

    __init__ = estimator_init(**COMMON_PARAMS)

    def _make_rule(self):
        return FirstOrder(self.inner_, full_stats=self.full_history)


@_doc
class Reptile(MetaLearner):
    """Reptile.

    Same inner loop as :class:`MAML` (k steps of size alpha from ``phi_0 = theta``), run on the
    support set or, with ``inner_data="task"``, on the support and query sets together; the
    per-task pseudo-gradient is ``theta - phi_k``, averaged over the meta-batch and fed to the
    meta-optimizer. With ``meta_optimizer="sgd"`` at step size epsilon this is
    ``theta <- theta + epsilon * mean_i(phi_k,i - theta)``. Reptile needs no held-out query set:
    with ``inner_data="support"`` the query set is only used for the reported curves, with
    ``"task"`` the inner loop learns from all of a task's examples during meta-training (as
    Nichol et al. train 1-shot Omniglot with 10 examples per class) and the query curves of
    ``history_`` are on examples the inner loop saw. ``adapt`` always uses the support set only.

    Parameters
    ----------
    {common}
    outer_stepsize : float or None, default=None
        Reptile's epsilon: the meta-optimizer's learning rate. ``None`` uses ``meta_lr``.
    inner_data : "support" or "task", default="support"
        The examples of the meta-training inner loop: the support set, or support and query.
    inner_shots : int or None, default=None
        ``None``: every inner step uses all of those examples. An integer ``s``: inner step ``j``
        uses examples ``j*s`` to ``(j+1)*s - 1`` of every class (support first, cyclically), so the
        steps see different mini-batches shaped like the support set (classification only). With
        ``inner_data="task"`` this is Reptile as published, whose update then favours parameters
        where gradients of different mini-batches of a task agree (Nichol et al., section 5).
    {attributes}
    Notes
    -----
    On Omniglot ``fewshot compare`` runs Reptile as published: ``inner_data="task"``,
    ``inner_shots=1`` (5 inner steps of 0.4, each on one example of every class out of the task's 1
    support + 5 query examples), Adam at ``outer_stepsize = 1e-3`` annealed linearly to zero
    (``meta_lr_schedule="linear"``), 10 steps on the support set at test. Its results, and those
    of a full-batch inner loop and of the support set alone, are in ``docs/results.md``.

    References
    ----------
    Nichol, Achiam, Schulman. On first-order meta-learning algorithms. arXiv:1803.02999, 2018.
    """

    __init__ = estimator_init(**_WITHOUT_SUBSET, outer_stepsize=None, inner_data="support", inner_shots=None)
    _extra_checks = {"outer_stepsize": lambda n, v: v is None or _step_size(n, v),
                     "inner_data": lambda n, v: check_choice(n, v, ("support", "task")),
                     "inner_shots": lambda n, v: v is None or check_number(n, v, low=1, integer=True)}

    def _outer_lr(self):
        return self.meta_lr if self.outer_stepsize is None else self.outer_stepsize

    def _make_rule(self):
        if self.inner_shots is not None and self.task_type_ != "classification":
            raise ValueError("inner_shots batches the inner loop by class: it needs a classification "
                             f"sampler, got a {self.task_type_} one; leave inner_shots=None")
        return ReptileRule(self.inner_, self.inner_data, self.inner_shots, full_stats=self.full_history)


#: Parameters of the implicit solvers' inner problem (ten inner steps: see IMAML's Notes).
_PROXIMAL_PARAMS = {**COMMON_PARAMS, "inner_steps": 10, "lam": 1.0, "damping": 0.0, "backtracking": True}


class _ProximalInnerProblem(MetaLearner):
    """The inner problem of the implicit solvers: ``Ls(phi) + lam/2 ||phi - theta||^2``, solved by
    gradient descent, with backtracking when ``backtracking=True`` (in meta-training and ``adapt``
    alike)."""

    _extra_checks = {"lam": _positive, "damping": _non_negative,
                     "backtracking": lambda n, v: check_choice(n, str(v), {"True", "False"})}

    def _lam(self):
        return float(self.lam)

    def _implicit_rule(self, solve):
        return Implicit(self.inner_, solve, damping=float(self.damping), full_stats=self.full_history)


@_doc
class IMAML(_ProximalInnerProblem):
    """Implicit MAML: the implicit meta-gradient of a proximally regularised inner problem.

    The inner problem is ``phi* = argmin_phi Ls(phi) + lam/2 ||phi - theta||^2``, approximated by k
    gradient steps of size alpha from ``phi_0 = theta`` (``adapt`` does the same). By the implicit
    function theorem ``d phi*/d theta = (I + H/lam)^{-1}`` with ``H = grad^2 Ls(phi*)``, so the
    meta-gradient is ``(I + H/lam)^{-1} grad Lq(phi*)`` (equivalently
    ``lam (H + lam I)^{-1} grad Lq(phi*)``), found by conjugate gradient on Hessian-vector products
    at ``phi*`` only, started from ``grad Lq(phi*)`` (the first-order answer). No graph is kept
    through the inner loop, so memory does not grow with ``inner_steps``.

    CG needs ``I + H/lam`` positive definite, true when ``lam > -lambda_min(H)``; on a direction of
    non-positive curvature CG stops and returns its smallest-residual iterate, never worse than its
    start (the fraction of such tasks is ``history_["negative_curvature"]``).
    ``history_`` also holds ``solve_iters`` and ``solve_residual`` (``||b - M x|| / ||b||``).

    ``damping`` solves the system with ``lam + damping`` in place of ``lam``, as iMAML's reference
    code does (``imaml_dev``: CG on ``2 v + H v / (lam + 10)``, i.e. ``I + H/24`` for ``lam=2``, up to
    a factor 2 of the answer).

    Where it is stable. (1) The inner loop must not diverge. Gradient descent with a fixed step on
    ``G = Ls + lam/2 ||phi - theta||^2`` needs ``inner_lr < 2 / (lam + lambda_max(H))`` along its
    path, and nothing in the implicit meta-gradient, which never differentiates the inner loop,
    keeps theta out of regions where meta-training has made the support loss sharper than that
    (MAML's exact gradient sees the blow-up and does). With ``backtracking=True`` (the default) a
    step is halved until ``G`` decreases (Armijo's condition), so ``G`` never increases whatever the
    curvature; where the step suits the curvature nothing is halved and the iterates are the fixed
    step's. (2) The implicit gradient is that of the minimiser ``phi*``, where ``I + H/lam`` is
    positive semi-definite: ``phi_k`` must be near it. Along flat directions k steps shrink the
    distance to ``phi*`` only by the factor ``(1 - inner_lr * lam)^k``, so few small steps leave the
    inner problem unsolved; CG then meets non-positive curvature in many tasks (a ``SolverWarning``
    when in most) and the meta-step follows a gradient of no objective. The defaults (10 steps with
    backtracking, ``lam=1``; ``inner_lr="auto"``) train every offline task family for their 2,000
    meta-steps (``python -m pytest -m slow``); 5 steps of 0.01 on sinusoid regression did not, with
    or without backtracking (``docs/defaults.md``).

    Parameters
    ----------
    {common}
    lam : float, default=1.0
        Proximal regularisation strength lambda.
    backtracking : bool, default=True
        Halve an inner step until the proximal objective decreases (Armijo's condition, step
        ``inner_lr`` tried first), in meta-training and in ``adapt``; False: fixed steps of
        ``inner_lr``.
    cg_steps : int, default=5
        Maximum conjugate-gradient iterations.
    cg_tol : float, default=1e-10
        Stop CG when the residual is below ``cg_tol * ||grad Lq||``.
    damping : float, default=0.0
        Added to ``lam`` in the linear system only: the meta-gradient becomes
        ``(I + H/(lam + damping))^{-1} grad Lq(phi*)``, the inner problem is unchanged. 0 is the
        implicit gradient; as it grows the answer tends to the first-order ``grad Lq(phi*)``.
        Positive values keep the system positive definite where ``H`` has curvature below
        ``-lam``; iMAML's reference code amounts to ``damping=22`` with ``lam=2``.
    {attributes}
    Notes
    -----
    On Omniglot 5-way 1-shot ``fewshot compare`` uses the report's inner loop: 5 proximal steps of
    0.01 with ``lam=1``, 5 CG steps, no damping, Adam at 1e-3, 15 training queries per class, and
    20 adaptation steps at test. Its results, and those of iMAML's paper setting with and without
    damping, are in ``docs/results.md``.

    References
    ----------
    Rajeswaran, Finn, Kakade, Levine. Meta-learning with implicit gradients. NeurIPS 2019.
    """

    __init__ = estimator_init(**_PROXIMAL_PARAMS, cg_steps=5, cg_tol=1e-10)
    _extra_checks = {**_ProximalInnerProblem._extra_checks, "cg_steps": _count, "cg_tol": _non_negative}

    def _make_rule(self):
        return self._implicit_rule(linalg.solve_cg(maxiter=int(self.cg_steps), tol=self.cg_tol, warm_start=True))


@_doc
class NeumannMAML(_ProximalInnerProblem):
    """iMAML's implicit meta-gradient with the inverse replaced by a truncated Neumann series.

    Inner problem and ``phi*`` as in :class:`IMAML`. With ``M = I + H/lam``, ``b = grad Lq(phi*)``,
    ``eta = neumann_lr`` and ``K = neumann_terms``, the meta-gradient is
    ``eta * sum_{j=0}^{K-1} (I - eta M)^j b``, which tends to ``M^{-1} b`` as K grows if and only if
    every eigenvalue ``mu`` of ``H`` satisfies ``0 < eta (1 + mu/lam) < 2``. ``eta = 1`` gives the
    report's listing ``sum_{j=0}^{K-1} (-H/lam)^j b`` (its "k=3", three Hessian-vector products, is
    ``neumann_terms=4``), which needs ``|mu| < lam``; a smaller ``eta`` is the damping that makes
    the series converge for any positive-definite ``M`` with ``eta < 2 / (1 + lambda_max(H)/lam)``.
    ``neumann_lr="auto"`` (the default) sets ``eta = 1 / rho`` per task, with ``rho`` a
    four-step power-iteration estimate of ``lambda_max(M)`` from ``b``
    (:func:`fewshot.linalg.spectral_radius`): the series then converges for any positive-definite
    ``M`` when ``rho > lambda_max(M) / 2``, whatever the scale of the curvature, which meta-training
    changes by orders of magnitude. Uses ``K`` Hessian-vector products (``K - 1`` for the series, one
    for the residual reported in ``history_["solve_residual"]``), 4 more with ``"auto"``. Where the
    condition fails the partial sums stop improving: the series is then cut at the partial sum with
    the smallest residual (``history_["solve_diverged"]`` is the fraction of such tasks; ``meta_fit``
    warns when it was more than half of its solves), so a divergent series never produces an
    overflowing meta-gradient.

    Parameters
    ----------
    {common}
    lam : float, default=1.0
        Proximal regularisation strength lambda of the inner problem.
    backtracking : bool, default=True
        As in :class:`IMAML` (where the conditions under which the implicit solvers are stable are
        stated).
    neumann_terms : int, default=4
        Number of series terms K.
    neumann_lr : float or "auto", default="auto"
        Damping eta of the series; "auto": ``1 / rho`` per task as above.
    damping : float, default=0.0
        Added to ``lam`` in the linear system only, as :class:`IMAML`'s: the series approximates
        ``(I + H/(lam + damping))^{-1} grad Lq(phi*)`` (``M = I + H/(lam + damping)`` above); the
        inner problem is unchanged. It widens the curvature range where the series converges to
        ``0 < eta (1 + mu/(lam + damping)) < 2``.
    {attributes}
    Notes
    -----
    On Omniglot ``fewshot compare`` uses the report's inner loop and series (5 steps of 0.01,
    ``lam=1``, 4 terms with ``eta=1``, the report's "k=3"; 15 training queries per class) with Adam
    from 5e-3 annealed linearly to zero (``meta_lr=5e-3``, ``meta_lr_schedule="linear"``). With
    ``eta=1`` the condition above is ``|mu| < lam``; where it fails the series is cut at its best
    partial sum, at the least its first term ``b``, the query gradient at the adapted parameters.
    Its results, how often the series is cut there, and the damped and ``eta < 1`` settings compared
    with it, are in ``docs/results.md``.

    References
    ----------
    Lorraine, Vicol, Duvenaud. Optimizing millions of hyperparameters by implicit
    differentiation. AISTATS 2020.
    """

    __init__ = estimator_init(**_PROXIMAL_PARAMS, neumann_terms=4, neumann_lr="auto")
    _extra_checks = {**_ProximalInnerProblem._extra_checks, "neumann_terms": _count,
                     "neumann_lr": functools.partial(check_number, low=0, low_open=True, allow=("auto",))}

    def _make_rule(self):
        lr = self.neumann_lr if self.neumann_lr == "auto" else float(self.neumann_lr)
        return self._implicit_rule(linalg.solve_neumann(terms=int(self.neumann_terms), lr=lr, stop_on_growth=True))


@_doc
class PenaltyMAML(MetaLearner):
    """MAML with a stationarity penalty on the adapted parameters.

    Inner loop as in :class:`MAML`. The per-task meta-objective is
    ``Lq(phi_k) + penalty * ||grad Ls(phi_k)||^2``, which adds to the query loss a penalty for
    violating the inner optimality condition ``grad Ls = 0``; the meta-gradient is its exact total
    derivative with respect to theta through all k inner steps (second order). ``penalty=0`` is
    :class:`MAML`. ``history_["query_loss_post"]`` reports ``Lq`` alone.

    Parameters
    ----------
    {common}
    penalty : float, default=0.01
        Weight lambda of the penalty. The penalty is not scale-free: ``||grad Ls||^2`` grows with the
        square of the loss's scale, and when it outweighs ``Lq`` meta-training flattens the support
        loss instead of fitting the query set (at 0.1 on ``LinearRegressionTasks`` the score fell
        below the untrained one; ``docs/defaults.md``).
    memory_efficient : bool, default=False
        As in :class:`MAML`.
    {attributes}
    Notes
    -----
    On Omniglot ``fewshot compare`` uses the class default inner loop (``alpha = 0.4``, 5 steps, 10
    at test; 5 training queries per class), ``penalty=0.01`` (the default) and Adam at 5e-3. Its results, and how close its
    meta-gradient is to MAML's at this weight, are in ``docs/results.md``.
    """

    __init__ = estimator_init(**COMMON_PARAMS, penalty=0.01, memory_efficient=False)
    _extra_checks = {"penalty": _non_negative,
                     "memory_efficient": lambda n, v: check_choice(n, str(v), {"True", "False"})}

    def _make_rule(self):
        objective = functools.partial(penalty_objective, penalty=float(self.penalty))
        return Unrolled(self.inner_, objective, memory_efficient=bool(self.memory_efficient),
                        full_stats=self.full_history)
