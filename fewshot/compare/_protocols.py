"""The settings of ``fewshot compare``: one table of protocols, each number with its source.

A protocol has ``shared`` settings (the meta-training loop, the task shapes and the evaluation),
per-solver parameter dicts (``solvers``), per-dataset amendments of both (``datasets``) and, within a
dataset, per-setting amendments of both (``datasets[d]["settings"]``, keyed ``"<n_way>w<k_shot>s"``,
e.g. ``"20w1s"``, chosen by the resolved ``n_way`` and ``k_shot``). :func:`resolve` applies them in
this order, later entries winning::

    estimator defaults < shared < datasets[d]["shared"] < solvers[s] < datasets[d]["solvers"][s]
                       < settings[t]["shared"] < settings[t]["solvers"][s] < command-line options

A setting's shared values win over the dataset's solver entries for the keys they set (20-way
1-shot's query size applies to every solver, whatever the 5-way 1-shot entries say).

A solver's entry holds estimator parameters, and may also set its own meta-training query size
(``n_query``, the one task setting that can differ between solvers: the evaluation is the same for
all). :func:`resolve` lists those in ``config["solver_tasks"]``.

Shared estimator settings come in two kinds. ``META_KEYS`` (meta-steps, meta learning rate and
optimizer) apply to every estimator, :class:`~fewshot.FineTune` included (for it they describe
pre-training). ``INNER_KEYS`` apply to the meta-learners only: for FineTune ``inner_lr`` and
``inner_steps`` describe the fit of a fresh head on each support set, a different procedure, so they
come from its own entry.

The ``report`` protocol is Table 1 of the report (A Comparative Analysis of Bilevel Optimization
Solvers for Meta-Learning, Samudrala, 2025), which is stated for Omniglot 5-way 1-shot; the report
leaves several numbers unstated and the values chosen for them are marked "not stated". The
``tuned`` protocol is ours.
"""

from __future__ import annotations

import copy

__all__ = ["PROTOCOLS", "DATASETS", "META_KEYS", "INNER_KEYS", "TASK_KEYS", "SOLVER_TASK_KEYS",
           "FOLDER_KEYS", "resolve", "setting_key"]

#: Shared estimator settings that apply to every estimator.
META_KEYS = ("meta_steps", "meta_lr", "meta_optimizer")
#: Shared estimator settings that apply to the meta-learners (not to FineTune).
INNER_KEYS = ("inner_lr", "inner_steps", "adapt_steps", "meta_batch_size")
#: Shared settings that describe the tasks and the evaluation (not estimator parameters).
TASK_KEYS = ("split", "n_way", "k_shot", "n_query", "eval_query", "eval_tasks", "eval_seed")
#: Task settings a solver's entry may set for itself (the meta-training query size).
SOLVER_TASK_KEYS = ("n_query",)

#: The task families ``fewshot compare`` knows, with their task shapes.
DATASETS = {
    # The report's setting: 5-way 1-shot on the Vinyals split (1,028 training characters with
    # rotations as new classes, 423 test characters), as MAML and the report.
    "omniglot": {"split": "vinyals", "n_way": 5, "k_shot": 1},
    # MAML's sinusoid regression: 10 support points per task (MAML section 5.1). No split.
    "sinusoid": {"split": None, "n_way": None, "k_shot": 10},
    # Gaussian clusters in 16 dimensions: a download-free classification family, 5-way 1-shot like
    # Omniglot. Meta-test tasks use classes (centres) never seen in meta-training.
    "clusters": {"split": None, "n_way": 5, "k_shot": 1},
    # A folder of labelled images (one subfolder per class, see fewshot.datasets.image_folder_tasks),
    # 5-way 1-shot like Omniglot; its classes are split train / validation / test (FOLDER_KEYS).
    "folder": {"split": None, "n_way": 5, "k_shot": 1},
}

#: Settings of the "folder" dataset, with their defaults: where the images are, how they are
#: preprocessed, and the class-disjoint split (fractions of the class groups, from ``split_seed``).
FOLDER_KEYS = {"data_dir": None, "image_size": 28, "mode": "RGB", "invert": False, "val_size": 0.2,
               "test_size": 0.2, "split_seed": 0}

# The report's Table 1 inner loop, with the report protocol's 15 training queries per class: the tuned
# Omniglot protocol's choice for MAML, FOMAML, IMAML and NeumannMAML (validation runs: docs/results.md).
REPORT_INNER_LOOP = {"inner_lr": 0.01, "inner_steps": 5, "adapt_steps": None, "meta_lr": 1e-3, "n_query": 15}
#: MAML's inner step for 20-way Omniglot (Finn et al., 2017), for the solvers on the report's loop.
#: IMAML adapts at test with the 5 steps it trains with, not the 20 its 5-way entry takes for steps of
#: 0.01: after 2,000 steps at 20-way 1-shot it scored 89.95% on the 600 validation tasks with 5 steps
#: at test, against 86.91 / 89.17 / 89.49 / 50.79 with 3 / 4 / 6 / 10 (docs/results.md, "IMAML's
#: adaptation steps at test").
TWENTY_WAY_INNER_STEP = {name: {"inner_lr": 0.1} for name in ("MAML", "FOMAML", "IMAML", "NeumannMAML")}
TWENTY_WAY_INNER_STEP["IMAML"]["adapt_steps"] = None

PROTOCOLS = {
    "report": {
        "description": "the report's Table 1 (Omniglot 5-way 1-shot), unstated values filled in",
        "shared": {
            "inner_lr": 0.01,          # Table 1: inner learning rate alpha
            "inner_steps": 5,          # Table 1: inner loop steps (training and test adaptation)
            "adapt_steps": None,       # not stated: test-time adaptation uses the same 5 steps
            "meta_lr": 1e-3,           # Table 1: outer learning rate epsilon
            "meta_optimizer": "adam",  # Table 1: optimizer
            "meta_batch_size": 16,     # Table 1: meta batch size
            "meta_steps": 2000,        # Table 1: meta-training steps
            "n_query": 15,             # not stated: meta-training query size, 15 per class as at test
            "eval_query": 15,          # Table 2 reports accuracy; 15 queries per class is the usual
                                       # Omniglot protocol (Finn et al., 2017)
            "eval_tasks": 600,         # not stated: 600 held-out tasks, the literature's standard
            "eval_seed": 0,            # fixed pool of evaluation tasks, the same for every solver
        },
        "solvers": {
            "MAML": {},                # Explicit 2nd-order: Table 1 as is
            "FOMAML": {},              # 1st-order: Table 1 as is
            # Section 4.1.1: the tuned outer learning rate of Reptile is 0.001 (with Adam, Table 1).
            "Reptile": {"outer_stepsize": 1e-3},
            # Not stated: lam=1.0 (the estimator's default, a moderate proximal term) and 5 CG
            # iterations (as many as the inner steps). The report's inner loop is plain gradient
            # descent (listing 3): no backtracking.
            "IMAML": {"lam": 1.0, "cg_steps": 5, "backtracking": False},
            # "Neumann (k=3)": the report's k counts Hessian-vector products (listing 4 loops k
            # times), i.e. 4 series terms, undamped (eta=1). lam is not stated: 1.0, the same
            # implicit system as IMAML, since the report presents Neumann as the alternative to CG
            # for it (section 2.2.5). Listing 4 literally sums (-alpha H)^j after a plain inner
            # loop, i.e. lam=1/alpha=100, which with alpha*lam=1 would undo the inner loop's
            # proximal steps; we keep the implicit-MAML reading.
            "NeumannMAML": {"lam": 1.0, "neumann_terms": 4, "neumann_lr": 1.0, "backtracking": False},
            # Not stated: penalty weight lambda=0.1.
            "PenaltyMAML": {"penalty": 0.1},
            # "Fine-tuning (head only)", no settings stated: the estimator's defaults (2000
            # pre-training steps of 64 examples, head fit by 100 steps of size 0.1).
            "FineTune": {"batch_size": 64, "inner_steps": 100, "inner_lr": 0.1},
        },
        "datasets": {
            # The report only covers Omniglot; on the other families Table 1 is applied unchanged,
            # except FineTune's head step, which diverges on sinusoid features at 0.1.
            "sinusoid": {"solvers": {"FineTune": {"inner_lr": 0.01}}},
        },
    },
    "tuned": {
        "description": "our settings, tuned from Omniglot validation runs (docs/results.md)",
        "shared": {
            "inner_lr": 0.4,           # MAML's Omniglot value (Finn et al., 2017)
            "inner_steps": 5,          # as the report; MAML uses 1 step for 5-way Omniglot
            "adapt_steps": 10,         # MAML adapts with 10 steps at test time
            "meta_lr": 1e-3,           # MAML's Adam step size
            "meta_optimizer": "adam",
            "meta_batch_size": 16,     # as the report (MAML: 32 for 5-way Omniglot)
            "meta_steps": 2000,        # the report's budget
            "n_query": 15,             # overridden per dataset below
            "eval_query": 15,          # evaluation always uses 15 queries per class
            "eval_tasks": 600,
            "eval_seed": 0,
        },
        "solvers": {
            "MAML": {},
            "FOMAML": {},
            # Reptile's epsilon is the learning rate of its Adam meta-optimizer (the report's best).
            "Reptile": {"outer_stepsize": 1e-3},
            # iMAML's implicit gradient needs a nearly solved inner problem: more inner steps.
            # (Omniglot amends these below.)
            "IMAML": {"lam": 0.5, "cg_steps": 5, "inner_steps": 10},
            # Damped series (eta=0.5) so that it converges for curvature up to 3*lam.
            "NeumannMAML": {"lam": 1.0, "neumann_terms": 4, "neumann_lr": 0.5},
            # A weaker penalty than the report protocol's, so the query loss dominates.
            "PenaltyMAML": {"penalty": 0.01},
            "FineTune": {"batch_size": 64, "inner_steps": 100, "inner_lr": 0.1},
        },
        "datasets": {
            # 5 query examples per class in meta-training (evaluation still uses 15) for Reptile and
            # PenaltyMAML: five times MAML's original 1, which lowers the variance of each task's
            # meta-gradient at a fraction of the cost of 15 (docs/results.md, "Training queries
            # per class"). MAML, FOMAML, IMAML and NeumannMAML train on 15 (REPORT_INNER_LOOP).
            "omniglot": {
                "shared": {"n_query": 5},
                "solvers": {
                    # The report's inner loop (5 steps of 0.01, Adam 1e-3, 15 training queries per
                    # class), chosen on 600 validation tasks after 2,000-step runs, over steps of 0.4
                    # with 5 training queries at several Adam steps (docs/results.md, "The outer step").
                    "MAML": {**REPORT_INNER_LOOP},
                    # The same with Adam from 5e-3 annealed linearly to zero, chosen on validation
                    # tasks over the constant 1e-3 (docs/results.md).
                    "FOMAML": {**REPORT_INNER_LOOP, "meta_lr": 5e-3, "meta_lr_schedule": "linear"},
                    # The report's inner loop with lam=1 and 5 CG steps (the report protocol's values),
                    # adapted by 20 steps at test, since 5 proximal steps of 0.01 leave the support set
                    # underfitted; chosen on validation tasks over 5 to 50 steps at test and over
                    # iMAML's paper setting (lam=2, 16 inner steps of 0.1) with and without the damped
                    # system of iMAML's reference code (docs/results.md). These runs, and NeumannMAML's,
                    # used plain gradient descent in the inner loop (backtracking=False).
                    "IMAML": {**REPORT_INNER_LOOP, "lam": 1.0, "cg_steps": 5, "adapt_steps": 20,
                              "backtracking": False},
                    # The report's inner loop and series (4 terms, eta=1, lam=1) with a larger outer step
                    # annealed linearly to zero (Adam from 5e-3), chosen on validation tasks over 3e-3
                    # and the report's constant 1e-3, and over damped series and series with eta < 1
                    # (docs/results.md).
                    "NeumannMAML": {**REPORT_INNER_LOOP, "lam": 1.0, "neumann_terms": 4, "neumann_lr": 1.0,
                                    "meta_lr": 5e-3, "meta_lr_schedule": "linear", "backtracking": False},
                    # Reptile as published (Nichol et al.): its inner loop learns from all of a task's
                    # examples (1 support + 5 query per class here), one class-balanced 1-shot batch per
                    # step, and the outer step anneals linearly to zero. Compared with full-batch inner
                    # loops on the support set and on support and query: docs/results.md.
                    "Reptile": {"inner_data": "task", "inner_shots": 1, "meta_lr_schedule": "linear"},
                    # Adam 5e-3, chosen on validation tasks over 1e-3 (docs/results.md, "The outer step").
                    "PenaltyMAML": {"meta_lr": 5e-3},
                    # The shared inner loop (steps of 0.4, 5 in meta-training, 10 at test, 5 training
                    # queries per class, Adam 1e-3), chosen on 600 validation tasks after 2,000 steps
                    # over MAML's 15 training queries: 95.99% against 96.08%, inside both intervals
                    # (+- 0.36), at about 1.7x the time per meta-step (docs/results.md).
                    "ANIL": {},
                    # Meta-SGD's own setting (Li et al., 2017): one inner step, in meta-training and at
                    # test, of the learned per-parameter rates (from 0.4); chosen on 600 validation
                    # tasks after 2,000 steps, 97.88% against 95.31% with the shared 5 and 10 steps.
                    "MetaSGD": {"inner_steps": 1, "adapt_steps": 1},
                    # The shared inner loop with MAML++'s own cosine schedule from Adam 1e-3 and its
                    # 200-step multi-step loss, learned steps from 0.4; chosen on 600 validation
                    # tasks after 2,000 steps over a cosine schedule from 5e-3 (the step that helped
                    # MAML with this loop): 96.36% against 95.15%.
                    "MAMLPlusPlus": {},
                },
                # The other settings of the published Omniglot table (docs/results.md). Each starts
                # from the 5-way 1-shot entries above and amends what was measured for it.
                "settings": {
                    # 5-way 5-shot: the 5-way 1-shot entries unchanged (not tuned separately).
                    "5w5s": {},
                    # 20-way 1-shot: one training query per class for every solver, MAML's own
                    # choice (K queries per class, Finn et al.'s code). Four times the images of a
                    # 5-way task make 5 queries cost ANIL 4-6x and FOMAML 2x a meta-step. ANIL pilots
                    # of 500 steps scored 92.77% (1 query) and 93.11% (5) on 600 validation tasks;
                    # in the time of those 500 five-query steps, one query reaches 2,000 steps and
                    # 94.30% (docs/results.md, "Training queries per class").
                    # The report's inner loop (5 steps of 0.01) barely adapts a 20-way task: FOMAML
                    # scored 8.2% on 600 validation tasks after 500 steps, and 79.8% with MAML's own
                    # 20-way step of 0.1. MAML, IMAML and NeumannMAML take that step too (not
                    # compared separately); IMAML adapts at test with its 5 training steps.
                    "20w1s": {"shared": {"n_query": 1}, "solvers": TWENTY_WAY_INNER_STEP},
                    # 20-way 5-shot: one training query per class as well. ANIL pilots of 500 steps
                    # scored 97.58% with 1 query and 97.59% with 5 (MAML's K) on 600 validation
                    # tasks, the 5 queries at 1.4x the time per step (docs/results.md, "Training
                    # queries per class").
                    # The 20-way inner step of 0.1 above, not yet compared at 5 shots.
                    "20w5s": {"shared": {"n_query": 1}, "solvers": TWENTY_WAY_INNER_STEP},
                },
            },
            # The small default of `fewshot compare`: minutes on a CPU for all ten estimators
            # (docs/compare.md).
            "sinusoid": {
                "shared": {
                    "inner_lr": 0.01,      # MAML's sinusoid value; 0.4 diverges on MSE
                    "n_query": 10,         # MAML's sinusoid value
                    "meta_batch_size": 8,  # half the Omniglot batch, to fit the time budget
                    "meta_steps": 300,     # a few hundred steps: a demonstration, not convergence
                    "eval_tasks": 100,
                },
                "solvers": {
                    # k steps of size alpha act like a ridge penalty of weight about 1/(alpha k)
                    # (early stopping as regularisation): lam = 1/(0.01 * 10) = 10 for IMAML's 10
                    # steps, so its proximal inner problem is the one the inner loop can solve
                    # (compared with the general lam=0.5: docs/defaults.md, "The tuned protocol on
                    # sinusoid").
                    "IMAML": {"lam": 10.0},
                    # lam=20 = 1/(0.01 * 5) as above; with eta=0.15 the series converges for
                    # support-loss curvature up to lam (2/eta - 1) = 247, above the curvature measured
                    # on sinusoid tasks, where smaller lam or larger eta let it diverge
                    # (docs/defaults.md, "The tuned protocol on sinusoid").
                    "NeumannMAML": {"lam": 20.0, "neumann_lr": 0.15},
                    "FineTune": {"inner_lr": 0.01},  # 0.1 diverges on sinusoid features
                },
            },
            "clusters": {"shared": {"n_query": 5, "meta_steps": 500, "eval_tasks": 200}},
        },
    },
}
# A user's image folder starts from the settings chosen on Omniglot, the image family they were
# tuned on (the report protocol applies Table 1 unchanged, as on every family).
PROTOCOLS["tuned"]["datasets"]["folder"] = copy.deepcopy(PROTOCOLS["tuned"]["datasets"]["omniglot"])


def resolve(protocol: str, dataset: str, solvers, overrides: dict | None = None,
            solver_overrides: dict | None = None) -> dict:
    """The settings of one comparison as a plain, JSON-serialisable dict.

    Parameters
    ----------
    protocol : {"report", "tuned"}
    dataset : {"omniglot", "sinusoid", "clusters", "folder"}
    solvers : list of str
        Names in :data:`fewshot.SOLVERS`.
    overrides : dict, optional
        Shared settings given on the command line (``None`` values are ignored): task keys
        (:data:`TASK_KEYS`), estimator keys (:data:`META_KEYS`, :data:`INNER_KEYS`), the folder
        dataset's settings (:data:`FOLDER_KEYS`; ``data_dir`` is needed for it) and
        ``device``/``seed``. They win over every protocol value, per-solver ones included;
        ``meta_lr`` also sets Reptile's ``outer_stepsize`` (its meta-optimizer's learning rate).
    solver_overrides : dict, optional
        ``{solver or "*": {param: value}}``: per-solver estimator parameters, applied last.

    Returns
    -------
    dict
        ``{"protocol", "dataset", <task keys>, "seed", "solvers": {name: estimator params},
        "solver_tasks": {name: task settings}}``; ``solver_tasks`` lists the solvers whose entry
        sets one of :data:`SOLVER_TASK_KEYS` (a command-line value wins over it).
    """
    from .. import SOLVERS

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or not solvers:
        raise ValueError(f"solvers must be a non-empty list of names from {list(SOLVERS)}, "
                         f"got {list(solvers)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    allowed = set(TASK_KEYS) | set(META_KEYS) | set(INNER_KEYS) | set(FOLDER_KEYS) | {"device", "seed"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"unknown shared setting(s) {bad}; expected some of {sorted(allowed)}")
    solver_overrides = solver_overrides or {}
    bad = sorted(set(solver_overrides) - set(SOLVERS) - {"*"})
    if bad:
        raise ValueError(f"--set names unknown solver(s) {bad}; expected names from {list(SOLVERS)} or none")

    table = copy.deepcopy(PROTOCOLS[protocol])
    amend = table["datasets"].get(dataset, {})
    shared = {**table["shared"], **DATASETS[dataset], **amend.get("shared", {})}
    setting = amend.get("settings", {}).get(setting_key({**shared, **overrides}), {})
    shared.update({**setting.get("shared", {}), **overrides})
    for key in ("split", "n_way"):
        if key in overrides and DATASETS[dataset][key] is None:
            raise ValueError(f"{key} does not apply to dataset={dataset!r}, got {key}={overrides[key]!r}")
    config = {"protocol": protocol, "dataset": dataset,
              **{k: shared[k] for k in TASK_KEYS}, "seed": shared.get("seed", 0), "solvers": {},
              "solver_tasks": {}}
    folder = {k: overrides.pop(k) for k in list(overrides) if k in FOLDER_KEYS}
    if dataset == "folder":
        config.update(_folder_settings(folder))
    elif folder:
        raise ValueError(f"{', '.join(sorted(folder))} only apply to dataset='folder', got dataset={dataset!r}")
    device = shared.get("device", "auto")
    for name in solvers:
        cls = SOLVERS[name]
        valid = cls().get_params(deep=False)
        keys = META_KEYS if name == "FineTune" else META_KEYS + INNER_KEYS
        params = {k: shared[k] for k in keys if k in valid and k in shared}
        entry = {**table["solvers"].get(name, {}), **amend.get("solvers", {}).get(name, {})}
        entry = {k: v for k, v in entry.items() if k not in setting.get("shared", {})}
        entry.update(setting.get("solvers", {}).get(name, {}))
        tasks = {k: entry.pop(k) for k in SOLVER_TASK_KEYS if k in entry}
        tasks = {k: v for k, v in tasks.items() if k not in overrides}  # the command line wins
        if tasks:
            config["solver_tasks"][name] = tasks
        params.update(entry)
        params.update({k: overrides[k] for k in keys if k in valid and k in overrides})
        if name == "Reptile" and "meta_lr" in overrides:
            params["outer_stepsize"] = overrides["meta_lr"]
        for target in ("*", name):
            for k, v in solver_overrides.get(target, {}).items():
                if k not in valid:
                    if target == "*":
                        continue
                    raise ValueError(f"--set {name}.{k}: {name} has no parameter {k!r}; "
                                     f"its parameters are {sorted(valid)}")
                params[k] = v
        params.update(device=device, random_state=config["seed"])
        config["solvers"][name] = params
    return config


def setting_key(config: dict) -> str | None:
    """The key of a task setting in ``datasets[d]["settings"]``: ``"20w1s"`` for 20-way 1-shot
    (``None`` for families without classes, such as sinusoid regression)."""
    if config.get("n_way") is None:
        return None
    return f"{config['n_way']}w{config['k_shot']}s"


def _folder_settings(given: dict) -> dict:
    """The folder dataset's settings: the defaults of :data:`FOLDER_KEYS` updated with ``given``,
    ``data_dir`` made absolute (a run's identity, whatever the working directory of its resume)."""
    import os

    settings = {**FOLDER_KEYS, **given}
    if settings["data_dir"] is None:
        raise ValueError("dataset='folder' needs data_dir (--data-dir): the folder with one subfolder "
                         "of images per class")
    settings["data_dir"] = os.path.abspath(os.fspath(settings["data_dir"]))
    if not os.path.isdir(settings["data_dir"]):
        raise ValueError(f"data_dir {settings['data_dir']} is not a folder")
    for key in ("val_size", "test_size"):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{key} must be a fraction in (0, 1) of the class groups, got {v!r}")
    if settings["val_size"] + settings["test_size"] >= 1:
        raise ValueError(f"val_size + test_size must leave classes to meta-train on, got "
                         f"{settings['val_size']} + {settings['test_size']}")
    return settings
