"""What stops or warns a fit: non-finite values, an inner loop that keeps raising the support loss,
uneven shards, and the rule's own warnings (a mixin of :class:`~fewshot.estimators._base.MetaLearner`)."""

from __future__ import annotations

import math

from ..exceptions import DivergenceError

__all__ = ["Guards"]


class Guards:
    def _warn_about_solves(self, first_step: int):
        """The rule's warnings about the statistics of ``history_`` from ``first_step`` on."""
        rule = self._make_rule()
        if rule is not None:
            rule.check_fit(self.history_, first_step, type(self).__name__)

    #: Consecutive meta-steps in which adaptation raises the mean support loss before meta-training
    #: is stopped (no tuned Omniglot run had more than 2 in a row; a broken-down one, hundreds).
    _INNER_LOOP_PATIENCE = 20

    def _check_inner_loop(self, record, rule):
        """Stop with :class:`DivergenceError` when adaptation has raised the meta-batch's mean support
        loss in ``_INNER_LOOP_PATIENCE`` consecutive meta-steps: the meta-parameters have reached a
        region where the inner loop diverges, and training has broken down even if every value is
        finite (IMAML at Adam 5e-3 on Omniglot fell to chance accuracy that way). Only for rules
        whose inner loop is descent on the support set alone (``rule.fits_support``)."""
        pre, post = record.get("support_loss_pre"), record.get("support_loss_post")
        if pre is None or post is None or not getattr(rule, "fits_support", True):
            return
        run = self._inner_loop_rising = self._inner_loop_rising + 1 if post > pre else 0
        if run >= self._INNER_LOOP_PATIENCE:
            raise DivergenceError(
                f"{type(self).__name__} broke down at meta-step {self.n_iter_ + 1}: in each of the last "
                f"{run} meta-steps the inner loop raised the mean support loss (now {pre:.4g} before "
                f"adaptation, {post:.4g} after), so the inner loop diverges at these meta-parameters. "
                f"params_ holds the meta-parameters after {self.n_iter_} steps, already in that region: "
                f"restart from a checkpoint taken earlier with a smaller meta_lr or inner_lr (or, for "
                f"IMAML, more damping).",
                step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=self._last_record())

    def _rising_run(self) -> int:
        """Consecutive meta-steps at the end of ``history_`` whose adaptation raised the support
        loss: a resumed or warm-started fit continues the count of the one before it."""
        pre, post = self.history_.get("support_loss_pre", []), self.history_.get("support_loss_post", [])
        run = 0
        for a, b in zip(reversed(pre), reversed(post)):
            if not b > a:
                break
            run += 1
        return run

    def _last_record(self):
        return {k: v[-1] for k, v in self.history_.items()} if self.history_ else {}

    def _diverged(self, record):
        bad = sorted(k for k, v in record.items() if not math.isfinite(v))
        raise DivergenceError(
            f"{type(self).__name__} diverged at meta-step {self.n_iter_ + 1}: non-finite {', '.join(bad)}. "
            f"params_ holds the last finite meta-parameters (after {self.n_iter_} steps); last finite "
            f"values: {self._last_record()}. Lower meta_lr or inner_lr, or set grad_clip.",
            step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=self._last_record())

    def _check_shards(self, world):
        """Each of the ``world.n_shards`` processes draws an equal part of the step's batch."""
        params = self.get_params(deep=False)
        name = "meta_batch_size" if "meta_batch_size" in params else "batch_size"
        size = params.get(name)
        if world.n_shards > 1 and size is not None and size % world.n_shards:
            raise ValueError(f"{name}={size} must be divisible by the number of processes "
                             f"({world.n_shards}): each process draws an equal shard of every batch")
