"""Cross-check the peers' MAML and first-order MAML meta-gradients in float64; an oracle for tests.

On one small problem (Conv4 with 8 filters, 2 tasks of 5-way 1-shot with 15 queries per class,
2 inner SGD steps at lr 0.4, float64) each peer computes the meta-gradient

    g = d/dtheta  mean_t  CE(f(phi_t; x_query_t), y_query_t),
    phi_t = theta - lr * grad CE(f(.; x_support_t), y_support_t), applied inner_steps times,

second-order ("maml") and first-order ("fomaml", dphi/dtheta taken as the identity), with the same
code that ``peer_step.py`` times. Batch norm uses batch statistics. The weights, the data and every
peer's gradients are saved to an ``.npz`` file and the largest differences between peers printed.

Command line (any Python; the computation runs in the peer venv made by ``setup_env.sh``)::

    python benchmarks/peers/check_agreement.py            # prints differences, exit 1 if > --tol
    python benchmarks/peers/check_agreement.py --out /tmp/peer_grads.npz --inner-steps 3

From a test, in fewshot's own environment::

    import importlib.util, pytest
    spec = importlib.util.spec_from_file_location("check_agreement", "benchmarks/peers/check_agreement.py")
    check_agreement = importlib.util.module_from_spec(spec); spec.loader.exec_module(check_agreement)
    if not check_agreement.peer_environment_available():
        pytest.skip("no peer venv (benchmarks/peers/setup_env.sh)")
    ref = check_agreement.reference_gradients()        # dict of torch float64 tensors
    model = fewshot.models.Conv4(hidden=ref["config"]["hidden"]); model.load_state_dict(ref["params"])
    # ... fewshot's meta-gradient on ref["tasks"] vs ref["grads"]["higher"]["maml"]

The parameter names (``features.0.0.weight``, ..., ``head.bias``) are those of ``fewshot.models.Conv4``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_PYTHON = REPO / "benchmarks" / ".venv-peers" / "bin" / "python"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import configs  # noqa: E402  (this folder is not a package; no torch import)

# The problem; every key is also a command-line option (--n-tasks, --inner-steps, ...).
PROBLEM = {
    "hidden": 8,
    "n_tasks": 2,
    "inner_steps": 2,
    "inner_lr": 0.4,
    "n_way": 5,
    "n_shot": 1,
    "n_query": 15,
    "image_size": 28,
    "seed": 0,
}
SOLVERS = ("maml", "fomaml")
TASK_KEYS = ("x_support", "y_support", "x_query", "y_query")
DEFAULT_TOL = 1e-10


def peers_importable() -> bool:
    """True if this interpreter has the three peer libraries (it is the peer venv)."""
    return all(importlib.util.find_spec(name) is not None for name in configs.LIBRARIES)


def peer_environment_available(python: os.PathLike | None = None) -> bool:
    """True if the gradients can be computed: here, or with the peer venv's interpreter."""
    return peers_importable() or Path(python or DEFAULT_PYTHON).exists()


def compute_gradients(libraries=configs.LIBRARIES, solvers=SOLVERS, **problem) -> dict:
    """Compute every peer's meta-gradients in this process (needs the peers importable).

    Returns ``{"config": {...}, "params": {name: tensor}, "tasks": {key: tensor [n_tasks, ...]},
    "grads": {library: {solver: {name: tensor}}}}``, all tensors float64 except the int64 labels.
    """
    import torch
    import torch.nn.functional as F

    import peer_step

    unknown = set(problem) - set(PROBLEM)
    if unknown:
        raise TypeError(f"unknown problem settings {sorted(unknown)}; expected some of {sorted(PROBLEM)}")
    config = {**PROBLEM, **problem}
    workload = {
        "model": "conv4", "loss": "cross_entropy", "hidden": config["hidden"],
        "n_tasks": config["n_tasks"], "inner_lr": config["inner_lr"], "n_way": config["n_way"],
        "n_shot": config["n_shot"], "n_query": config["n_query"],
        "image_shape": (1, config["image_size"], config["image_size"]),
    }
    dtype = torch.float64
    torch.manual_seed(config["seed"])
    template = peer_step.build_model(workload, dtype)
    tasks = peer_step.make_tasks(workload, dtype, torch.Generator().manual_seed(config["seed"] + 1))
    params = {name: p.detach().clone() for name, p in template.named_parameters()}

    grads: dict = {}
    for library in libraries:
        for solver in solvers:
            if solver not in configs.SOLVERS[library]:
                continue
            model = copy.deepcopy(template)
            accumulate = peer_step.make_meta_gradient(
                library, solver, model, F.cross_entropy, config["inner_steps"], config["inner_lr"]
            )
            model.zero_grad(set_to_none=True)
            accumulate(tasks)
            for name, p in model.named_parameters():  # the meta-gradient must not move theta
                if not torch.equal(p.detach(), params[name]):
                    raise RuntimeError(f"{library} {solver} changed parameter {name} while computing a gradient")
            grads.setdefault(library, {})[solver] = {
                name: p.grad.detach().clone() for name, p in model.named_parameters()
            }
    stacked = {key: torch.stack([task[i] for task in tasks]) for i, key in enumerate(TASK_KEYS)}
    return {"config": config, "params": params, "tasks": stacked, "grads": grads}


def save(result: dict, path: os.PathLike) -> Path:
    """Write ``result`` (as from ``compute_gradients``) to an ``.npz`` file with flat keys
    ``config``, ``param/<name>``, ``task/<key>``, ``grad/<library>/<solver>/<name>``."""
    import numpy as np

    arrays = {"config": np.array(json.dumps(result["config"]))}
    arrays.update({f"param/{k}": v.numpy() for k, v in result["params"].items()})
    arrays.update({f"task/{k}": v.numpy() for k, v in result["tasks"].items()})
    for library, by_solver in result["grads"].items():
        for solver, named in by_solver.items():
            arrays.update({f"grad/{library}/{solver}/{k}": v.numpy() for k, v in named.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
        np.savez(f, **arrays)
    return path


def load(path: os.PathLike) -> dict:
    """Read a file written by ``save`` back into the nested dict of torch tensors."""
    import numpy as np
    import torch

    result: dict = {"params": {}, "tasks": {}, "grads": {}}
    with np.load(path) as data:
        for key in data.files:
            if key == "config":
                result["config"] = json.loads(str(data[key]))
                continue
            kind, rest = key.split("/", 1)
            value = torch.from_numpy(data[key].copy())
            if kind == "param":
                result["params"][rest] = value
            elif kind == "task":
                result["tasks"][rest] = value
            else:
                library, solver, name = rest.split("/", 2)
                result["grads"].setdefault(library, {}).setdefault(solver, {})[name] = value
    return result


def _default_path() -> Path:
    return Path(tempfile.mkdtemp(prefix="fewshot-peer-grads-")) / "peer_gradients.npz"


def reference_gradients(path: os.PathLike | None = None, python: os.PathLike | None = None,
                        libraries=configs.LIBRARIES, solvers=SOLVERS, **problem) -> dict:
    """The peers' meta-gradients as from ``compute_gradients``, computed in this process when the
    peers are importable here and otherwise by the peer venv's interpreter (``python``, default
    ``benchmarks/.venv-peers/bin/python``) in a subprocess. They are saved to the ``.npz`` file
    ``path`` (default: ``peer_gradients.npz`` in a new temporary directory), returned under "path".

    Raises ``FileNotFoundError`` when neither is available (a test should skip then).
    """
    path = Path(path) if path is not None else _default_path()
    if peers_importable():
        save(compute_gradients(libraries, solvers, **problem), path)
    else:
        python = Path(python or DEFAULT_PYTHON)
        if not python.exists():
            raise FileNotFoundError(f"no peer environment at {python}; run benchmarks/peers/setup_env.sh")
        command = [str(python), str(Path(__file__).resolve()), "--out", str(path), "--quiet",
                   "--libraries", *libraries, "--solvers", *solvers]
        for key, value in problem.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = load(path)
    result["path"] = str(path)
    return result


def differences(result: dict) -> dict:
    """``{solver: {(library_a, library_b): max |g_a - g_b| over all parameters}}``."""
    out: dict = {}
    solvers = sorted({s for by_solver in result["grads"].values() for s in by_solver})
    for solver in solvers:
        having = [lib for lib in result["grads"] if solver in result["grads"][lib]]
        for a, b in itertools.combinations(having, 2):
            ga, gb = result["grads"][a][solver], result["grads"][b][solver]
            out.setdefault(solver, {})[(a, b)] = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    return out


def meta_loss(params: dict, result: dict):
    """The meta-objective whose gradient "maml" is, evaluated with plain torch (no peer library):
    mean over tasks of the query loss after ``inner_steps`` SGD steps on the support loss."""
    import torch
    import torch.nn.functional as F

    import peer_step

    config = result["config"]
    with torch.device("meta"):
        model = peer_step.Conv4(1, config["n_way"], config["hidden"], config["image_size"])

    def forward(weights, x):
        return torch.func.functional_call(model, weights, (x,))

    tasks, total = result["tasks"], 0.0
    for t in range(config["n_tasks"]):
        weights = dict(params)
        for _ in range(config["inner_steps"]):
            leaves = {k: v.detach().requires_grad_() for k, v in weights.items()}
            with torch.enable_grad():
                loss = F.cross_entropy(forward(leaves, tasks["x_support"][t]), tasks["y_support"][t])
                grads = torch.autograd.grad(loss, list(leaves.values()))
            weights = {k: v.detach() - config["inner_lr"] * g for (k, v), g in zip(leaves.items(), grads)}
        total += float(F.cross_entropy(forward(weights, tasks["x_query"][t]), tasks["y_query"][t]))
    return total / config["n_tasks"]


def directional_check(result: dict, library: str = "higher", eps: float = 1e-8, seed: int = 0) -> float:
    """Relative error of ``library``'s second-order meta-gradient against a central finite
    difference of ``meta_loss`` along a random direction (independent of every peer).

    ``eps`` is tiny on purpose: after an inner step the meta-loss is only piecewise smooth (the
    support gradient jumps wherever a ReLU or max-pool switches, and at lr 0.4 on random data the
    jumps are dense: steps of 1e-5 already cross some). At 1e-8 in float64 the default problem
    agrees to about 1e-6; larger ``eps`` gives errors of order one that say nothing about MAML.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = result["params"]
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    plus = meta_loss({k: v + eps * direction[k] for k, v in params.items()}, result)
    minus = meta_loss({k: v - eps * direction[k] for k, v in params.items()}, result)
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float((result["grads"][library]["maml"][k] * direction[k]).sum()) for k in params)
    return abs(numeric - analytic) / max(abs(numeric), 1e-300)


FD_TOL = 1e-4


def report(result: dict) -> tuple[str, float, float | None]:
    """A printable summary, the largest difference between peers, and the relative error of the
    second-order meta-gradient against finite differences (None without a "maml" result)."""
    lines, worst, fd_error = [], 0.0, None
    lines.append("problem: " + json.dumps(result["config"]))
    for solver, pairs in differences(result).items():
        scale = max(float(g.abs().max()) for lib in result["grads"] for g in result["grads"][lib].get(solver, {}).values())
        lines.append(f"{solver}: max |g| = {scale:.3e}")
        for (a, b), diff in pairs.items():
            lines.append(f"  max |{a} - {b}| = {diff:.3e}")
            worst = max(worst, diff)
    for lib, by_solver in result["grads"].items():
        if "maml" in by_solver and "fomaml" in by_solver:
            gap = max(float((by_solver["maml"][k] - by_solver["fomaml"][k]).abs().max()) for k in by_solver["maml"])
            lines.append(f"{lib}: max |maml - fomaml| = {gap:.3e} (second order matters: should be far above the peer differences)")
    for lib, by_solver in result["grads"].items():
        if "maml" in by_solver:
            fd_error = directional_check(result, lib)
            lines.append(f"{lib}: maml vs central finite difference (eps 1e-8) of the meta-loss along a random "
                         f"direction: relative error {fd_error:.2e} (tolerance {FD_TOL:g})")
            break
    return "\n".join(lines), worst, fd_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, default in PROBLEM.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--libraries", nargs="+", default=list(configs.LIBRARIES), choices=configs.LIBRARIES)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=configs.ALL_SOLVERS)
    parser.add_argument("--out", type=Path, default=None, help="the .npz to write (default: in a new temp dir)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="exit 1 if two peers differ by more")
    parser.add_argument("--threads", type=int, default=configs.DEFAULT_THREADS)
    parser.add_argument("--python", type=Path, default=None, help="peer venv interpreter, if not this one")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    problem = {key: getattr(args, key) for key in PROBLEM}

    if peers_importable():
        import torch

        torch.set_num_threads(args.threads)
        result = compute_gradients(args.libraries, args.solvers, **problem)
        path = save(result, args.out or _default_path())
    else:
        result = reference_gradients(args.out, args.python, args.libraries, args.solvers, **problem)
        path = result["path"]
    if args.quiet:  # the caller (reference_gradients) only wants the file
        return 0
    text, worst, fd_error = report(result)
    print(text)
    print(f"saved: {path}")
    print(f"largest difference between peers: {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol and (fd_error is None or fd_error <= FD_TOL) else 1


if __name__ == "__main__":
    sys.exit(main())
