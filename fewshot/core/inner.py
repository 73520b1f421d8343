"""The inner problem: what adapting to one task's support set does.

An :class:`InnerProblem` says which parameters the inner loop adapts, how each step updates them
(gradient descent with a scalar step, or with per-parameter or per-layer-per-step steps that are
themselves meta-parameters), the optional proximal term of the implicit solvers and the number of
steps. Every meta-gradient rule (:mod:`fewshot.core.rules`), an estimator's ``adapt``,
``evaluate`` and ``meta_gradient`` and the diagnostics run one estimator's one instance, so
meta-training and test-time adaptation cannot drift apart.

Meta-parameters ``theta`` are a dict: the network's parameters under their module names, plus any
meta-parameters of the inner problem itself: learned steps under :data:`LR_PREFIX`
(``"inner_lr.<parameter>"``) and per-step copies of parameters under :data:`STEP_PREFIX`
(``"inner_step.<j>.<parameter>"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from .functional import value_and_grad
from .tree import Params

__all__ = ["InnerProblem", "InnerResult", "LR_PREFIX", "STEP_PREFIX", "LEARNED_LRS", "ARMIJO_C", "network_params"]

#: Key prefix of learned inner learning rates in a meta-parameter dict.
LR_PREFIX = "inner_lr."
#: Key prefix of per-step copies of network parameters (``"inner_step.<j>.<parameter>"``).
STEP_PREFIX = "inner_step."
#: ``learn_lr`` choices: the shape of each adapted parameter's learned step.
LEARNED_LRS = ("per_parameter", "per_layer_per_step")
#: Sufficient-decrease constant of the backtracking line search (Armijo's condition).
ARMIJO_C = 1e-4

Selection = Union[None, str, Sequence[str], Callable[[str], bool]]


def network_params(theta: Params) -> Params:
    """The network's parameters in ``theta`` (every key outside :data:`LR_PREFIX` and
    :data:`STEP_PREFIX`)."""
    return {k: v for k, v in theta.items() if not k.startswith((LR_PREFIX, STEP_PREFIX))}


class InnerResult(NamedTuple):
    """What :meth:`InnerProblem.run` returns.

    ``phi`` holds every network parameter (the adapted ones after the last step, the others as in
    ``theta``); ``first`` is ``(loss, metric)`` of the support set at ``theta`` (``None`` without
    steps); ``path`` is ``[phi_0, ..., phi_{k-1}]`` when asked for (else empty).
    """

    phi: Params
    first: tuple | None
    path: list


@functools.lru_cache(maxsize=256)
def _resolve(adapt, names: tuple) -> tuple:
    if adapt is None:
        return names
    if callable(adapt):
        chosen = tuple(n for n in names if adapt(n))
        if not chosen:
            raise ValueError(f"the inner_params predicate selects none of the network's parameters {list(names)}")
        return chosen
    entries = (adapt,) if isinstance(adapt, str) else tuple(adapt)
    chosen = set()
    for entry in entries:
        hits = {n for n in names if n == entry or n.startswith(entry + ".")}
        if not hits:
            raise ValueError(f"inner_params entry {entry!r} names no parameter or module of the network; "
                             f"its parameters are {list(names)}")
        chosen |= hits
    return tuple(n for n in names if n in chosen)


@dataclass(frozen=True)
class InnerProblem:
    """Gradient descent on one task's support loss, from the meta-parameters.

    With support loss ``Ls``, adapted parameters ``phi`` (those chosen by ``adapt``; the others stay
    at their meta-parameter values throughout) and ``phi_0 = theta``::

        phi_{j+1} = phi_j - a_j * (grad Ls(phi_j) + lam * (phi_j - theta))     j = 0, ..., steps - 1

    (the proximal term only when ``lam`` is set: iMAML's regularised problem
    ``Ls(phi) + lam/2 ||phi - theta||^2`` over the adapted parameters, centred at ``theta`` as a
    constant of the inner problem). The step ``a_j``, elementwise:

    - ``learn_lr=None``: the scalar ``lr``;
    - ``"per_parameter"``: a tensor shaped like each adapted parameter, the meta-parameter
      ``theta["inner_lr.<name>"]`` (Meta-SGD's alpha), the same at every step;
    - ``"per_layer_per_step"``: one scalar per adapted parameter tensor and step, the vector
      ``theta["inner_lr.<name>"]`` of length ``steps`` (MAML++'s LSLR; ``a_j`` is its entry ``j``,
      the last one for steps beyond ``steps`` at test time).

    ``per_step`` names network parameters that are not adapted but take a separate meta-learned
    value at each step (MAML++'s per-step batch-norm weights and biases): step ``j`` evaluates
    the support loss with ``theta["inner_step.<j>.<name>"]`` (``theta[name]`` itself at step 0)
    and the adapted network uses copy ``k`` (the last copy beyond ``steps``).

    Learned steps and per-step copies start at ``lr`` and at the parameter's value
    (:meth:`meta_parameters`) and are meta-parameters like the weights: a rule that differentiates through the loop (:class:`~fewshot.core.rules.Unrolled`)
    gives their gradient. ``backtracking=True`` halves a step until the (proximal) objective
    decreases by Armijo's condition (:meth:`run`); it is for rules that do not differentiate the
    loop (the implicit ones) and for ``adapt``, and needs the scalar ``lr``.

    When only a head of the network is adapted (every adapted parameter belongs to layers after
    the others, as ANIL's last linear layer) and the network is one whose layers fewshot runs
    itself (:class:`~fewshot.models.Conv4`, :class:`~fewshot.models.MLP`, plain ``nn.Sequential``),
    the body's output is computed once per call and the steps run the head alone: the same
    iterates, at a fraction of the cost.

    Parameters
    ----------
    steps : int
        Number of steps k.
    lr : float
        The step size (or the initial value of learned ones).
    adapt : None, str, sequence of str or callable, default=None
        The adapted parameters: all (None); the parameters named, or under the modules named
        (``"head"`` selects ``head.weight`` and ``head.bias``); or those for which
        ``adapt(name)`` is true.
    learn_lr : None, "per_parameter" or "per_layer_per_step", default=None
    per_step : None, str, sequence of str or callable, default=None
        Parameters with a meta-learned copy per step (selected as ``adapt`` selects); never adapted.
    lam : float or None, default=None
        Proximal weight.
    backtracking : bool, default=False
    max_halvings : int, default=30
        Halvings tried per step with backtracking before the loop stops at the current iterate.
    """

    steps: int
    lr: float
    adapt: Selection = None
    learn_lr: str | None = None
    per_step: Selection = None
    lam: float | None = None
    backtracking: bool = False
    max_halvings: int = 30

    def __post_init__(self):
        for name in ("adapt", "per_step"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.learn_lr is not None and self.learn_lr not in LEARNED_LRS:
            raise ValueError(f"learn_lr must be None or one of {list(LEARNED_LRS)}, got {self.learn_lr!r}")
        if self.backtracking and (self.learn_lr is not None or self.per_step is not None):
            raise ValueError("backtracking searches the scalar step lr on one loss; it cannot be combined with "
                             "learned steps or per-step parameters")

    @property
    def has_meta_parameters(self) -> bool:
        """Whether the inner problem has meta-parameters of its own (learned steps or per-step
        copies), which only a rule that differentiates the loop gives a gradient."""
        return self.learn_lr is not None or self.per_step is not None

    # ------------------------------------------------------------------ which parameters
    def adapted(self, theta: Params) -> tuple:
        """Names of the adapted network parameters of ``theta``, in ``theta``'s order."""
        names = tuple(network_params(theta))
        chosen = _resolve(self.adapt, names)
        if self.per_step is None:
            return chosen
        stepped = set(self.stepped(theta))
        chosen = tuple(n for n in chosen if n not in stepped)
        if not chosen:
            raise ValueError("every adapted parameter is also a per-step parameter: nothing is left to adapt")
        return chosen

    def stepped(self, theta: Params) -> tuple:
        """Names of the network parameters with per-step copies (empty without ``per_step``)."""
        if self.per_step is None:
            return ()
        return _resolve(self.per_step, tuple(network_params(theta)))

    def _at_step(self, theta: Params, name: str, j: int):
        """The value of per-step parameter ``name`` at step ``j``."""
        return theta[name] if j == 0 else theta[f"{STEP_PREFIX}{min(j, max(self.steps, 1))}.{name}"]

    def meta_parameters(self, weights: Params) -> Params:
        """The inner problem's own meta-parameters for a network with parameters ``weights``: the
        learned steps at their initial value ``lr`` and the per-step copies at the parameters'
        values (empty for a fixed step and no per-step parameters)."""
        names, extra = self.adapted(weights), {}
        if self.learn_lr == "per_parameter":
            extra.update({LR_PREFIX + n: torch.full_like(weights[n], float(self.lr)) for n in names})
        elif self.learn_lr == "per_layer_per_step":
            like = weights[names[0]]
            extra.update({LR_PREFIX + n: torch.full((max(self.steps, 1),), float(self.lr), dtype=like.dtype,
                                                    device=like.device) for n in names})
        for j in range(1, max(self.steps, 1) + 1):
            extra.update({f"{STEP_PREFIX}{j}.{n}": weights[n].detach().clone() for n in self.stepped(weights)})
        return extra

    def _step(self, theta: Params, name: str, j: int, g: Tensor):
        if self.learn_lr is None:
            return self.lr
        a = theta[LR_PREFIX + name]
        if self.learn_lr == "per_parameter":
            return a
        a = a[..., min(j, a.shape[-1] - 1)]  # a leading task axis, if any, stays
        return a.reshape(a.shape + (1,) * (g.dim() - a.dim()))

    # ------------------------------------------------------------------ running it
    def run(self, task_loss, theta: Params, x: Tensor, y: Tensor, *, steps: int | None = None,
            create_graph: bool = False, first_order: bool = False, keep_path: bool = False) -> InnerResult:
        """Run the inner loop on ``(x, y)`` from ``theta`` (``steps`` overrides the step count, as
        ``adapt_steps`` does at test time).

        ``create_graph=True`` keeps the loop differentiable in ``theta`` (whose tensors must then
        require grad or come from tensors that do): second order through every step, or with
        ``first_order=True`` only through the updates' arithmetic, the support gradients taken as
        constants (so ``d phi_k / d theta = I`` on the adapted weights, and learned steps get
        ``-sum_j g_j`` times the outer gradient). Otherwise no graph is kept. ``keep_path`` keeps
        the iterates ``phi_0 .. phi_{k-1}``.
        """
        k = self.steps if steps is None else steps
        if self.backtracking:
            if create_graph:
                raise ValueError("a backtracking inner loop is not differentiable: use it with rules that "
                                 "do not differentiate the loop (the implicit ones) or set backtracking=False")
            return self._descend(task_loss, theta, x, y, k)
        weights = network_params(theta)
        names, stepped = self.adapted(weights), self.stepped(theta)
        fixed = {n: v for n, v in weights.items() if n not in names}
        if not create_graph:
            fixed = {n: v.detach() for n, v in fixed.items()}
            theta = {n: v.detach() for n, v in theta.items()} if stepped else theta
        # per-step parameters change the whole network at every step: no features to reuse
        loss, x = (task_loss, x) if stepped else _on_features(task_loss, names, weights, fixed, x, create_graph)
        centre = {n: weights[n] for n in names}
        phi, first, path = dict(centre), None, []
        for j in range(k):
            at_j = {**fixed, **{n: self._at_step(theta, n, j) for n in stepped}}
            if keep_path:
                path.append({**weights, **at_j, **phi})

            def objective(p, at_j=at_j):
                return loss.with_aux({**at_j, **p}, x, y)

            g, aux = value_and_grad(objective, phi, create_graph=create_graph and not first_order)
            if j == 0:
                first = aux
            with torch.set_grad_enabled(create_graph):
                if self.lam is not None:
                    g = {n: g[n] + self.lam * (phi[n] - centre[n]) for n in names}
                phi = {n: phi[n] - self._step(theta, n, j, g[n]) * g[n] for n in names}
        if not create_graph:
            phi = {n: v.detach() for n, v in phi.items()}
        phi.update({n: self._at_step(theta, n, k) for n in stepped})
        return InnerResult({n: phi.get(n, v if create_graph else v.detach()) for n, v in weights.items()},
                           first, path)

    def _descend(self, task_loss, theta: Params, x: Tensor, y: Tensor, k: int) -> InnerResult:
        """``k`` steps with backtracking on ``G = Ls + lam/2 ||phi - theta||^2`` (``lam`` 0 if unset).

        Step ``j`` tries ``phi_j - t grad G(phi_j)`` with ``t = lr`` and halves ``t`` until
        ``G(trial) <= G(phi_j) - ARMIJO_C * t ||grad G(phi_j)||^2`` (up to 8 ulps of ``G``, so that
        steps near the minimum, whose decrease is below ``G``'s rounding, are taken); after
        ``max_halvings`` failed halvings the loop stops at ``phi_j``. So ``G`` never increases beyond
        its rounding, whatever the curvature; where ``lr`` suits the curvature nothing is halved and
        the iterates are the fixed step's."""
        weights = {n: v.detach() for n, v in network_params(theta).items()}
        names = self.adapted(weights)
        fixed = {n: v for n, v in weights.items() if n not in names}
        loss, x = _on_features(task_loss, names, weights, fixed, x, False)
        centre = {n: weights[n] for n in names}
        lam = 0.0 if self.lam is None else float(self.lam)

        def objective(phi):
            g, aux = value_and_grad(lambda p: loss.with_aux({**fixed, **p}, x, y), phi)
            with torch.no_grad():
                value = aux[0] + lam / 2 * sum(torch.sum((phi[n] - centre[n]) ** 2) for n in names)
                g = {n: g[n] + lam * (phi[n] - centre[n]) for n in names}
            return value, g, aux

        if k == 0:
            return InnerResult(weights, None, [])
        phi = centre
        value, g, first = objective(phi)
        eps = torch.finfo(value.dtype).eps
        for _ in range(k):
            slope = sum(torch.sum(v * v) for v in g.values())
            t = float(self.lr)
            for _ in range(self.max_halvings + 1):
                with torch.no_grad():
                    trial = {n: phi[n] - t * g[n] for n in names}
                trial_value, trial_g, _ = objective(trial)
                # Within a few ulps of G: near the minimum the decrease falls below G's rounding
                if bool(trial_value <= value - ARMIJO_C * t * slope + 8 * eps * abs(value)):  # False for NaN
                    break
                t /= 2
            else:
                break
            phi, value, g = trial, trial_value, trial_g
        return InnerResult({**weights, **phi}, first, [])

    def support_loss(self, task_loss, phi: Params, x: Tensor, y: Tensor, *, create_graph: bool = False):
        """``(loss over the adapted parameters, adapted part of phi)``: the function ``h -> Ls(h)``
        of the adapted parameters with the others held at ``phi`` (on the body's features computed
        once when the network splits there), for Hessian-vector products."""
        weights = network_params(phi)
        names = self.adapted(weights)
        fixed = {n: v if create_graph else v.detach() for n, v in weights.items() if n not in names}
        loss, x = _on_features(task_loss, names, weights, fixed, x, create_graph)
        return (lambda h: loss({**fixed, **h}, x, y)), {n: weights[n] for n in names}


def _on_features(task_loss, names, weights, fixed, x, create_graph):
    """``(loss, inputs)`` for the inner loop: the task loss on ``x`` or, when the network splits
    before every adapted parameter, the head's loss on the body's output (computed here, once)."""
    split = getattr(task_loss, "split", None)
    parts = split(names) if split is not None and len(names) < len(weights) else None
    if parts is None:
        return task_loss, x
    features, head_loss = parts
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        feats = features(fixed if create_graph else {n: v.detach() for n, v in weights.items()}, x)
    return head_loss, feats
