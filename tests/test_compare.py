"""`fewshot compare` end to end: tables, files, figures, resuming, protocols, the command line."""

import copy
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fewshot
from fewshot.compare import _run as _compare, _protocols
from fewshot.exceptions import SolverWarning
from fewshot.__main__ import main
from fewshot.compare import UsageError, format_table, load_results, run_comparison
from fewshot.plotting import moving_average, plot_learning_curves, plot_score_vs_time, plot_validation_curves
from _util import sigkill_once_written

TINY = ["--dataset", "clusters", "--n-way", "3", "--n-query", "2", "--eval-query", "3",
        "--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "1", "--eval-tasks", "6",
        "--chunk-size", "2", "--fidelity-tasks", "2", "--seed", "0"]


def run_cli(args, cwd, timeout=170):
    return subprocess.run([sys.executable, "-m", "fewshot", "compare", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def same_number(text, value):
    if value is None:
        return text == ""
    return float(text) == value if isinstance(value, float) else text == str(value)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One comparison by the command line, in subprocesses, then the same command again."""
    cwd = tmp_path_factory.mktemp("cli")
    args = ["--solvers", "MAML,FOMAML,FineTune", "--out", "out", *TINY]
    first = run_cli([*args, "--quiet"], cwd)
    assert first.returncode == 0, first.stderr
    out = cwd / "out"
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    second = run_cli(args, cwd)
    return out, first, second, stamps


def test_cli_writes_consistent_table_files_and_figures(cli_run):
    out, first, _, _ = cli_run
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["MAML", "FOMAML", "FineTune"]
    assert [r["type"] for r in rows] == ["Explicit 2nd-Order", "1st-Order", "Non-Meta"]
    csv_rows = read_csv(out / "results.csv")
    assert list(csv_rows[0]) == list(_compare.TABLE_FIELDS)
    for row, csv_row in zip(rows, csv_rows, strict=True):
        result = json.loads((out / row["method"] / "result.json").read_text())
        assert result["status"] == "ok" and result["metric"] == "accuracy"
        assert result["meta_steps"] == 4 and result["n_eval_tasks"] == 6 == len(result["scores"])
        assert result["score_mean"] == pytest.approx(np.mean(result["scores"]), abs=1e-12)
        assert 0 <= result["score_mean"] <= 1 and result["peak_rss_mb"] > 10
        assert result["rss_scope"] == "solver process" and result["threads"] == 2
        assert result["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        assert result["s_per_step"] == pytest.approx(result["train_time_s"] / 4)
        for key in _compare.TABLE_FIELDS:
            assert row[key] == result[key], key
            assert same_number(csv_row[key], result[key]), key
        # the printed table shows the same numbers
        assert f"{100 * result['score_mean']:.2f} +- {100 * result['score_ci95']:.2f}" in first.stdout
        history = json.loads((out / row["method"] / "history.json").read_text())
        assert all(len(v) == 4 for v in history.values())
        # the meta-trained parameters, loadable without training, score the same tasks the same
        est = fewshot.load_meta_params(out / row["method"] / "meta_params.pt")
        test = _compare.make_samplers(json.loads((out / row["method"] / "config.json").read_text())).test
        assert _compare._evaluate(est, test, 6, 0)[0] == pytest.approx(result["score_mean"], abs=1e-12)
    for name in ("curves_loss.png", "curves_accuracy.png", "score_vs_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    fidelity = json.loads((out / "fidelity.json").read_text())["rows"]
    assert [(r["method"], r["reference"]) for r in fidelity] == [("MAML", "unrolled"), ("FOMAML", "unrolled")]
    assert fidelity[0]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert [r["method"] for r in read_csv(out / "fidelity.csv")] == ["MAML", "FOMAML"]
    assert "Meta-gradient fidelity" in first.stdout and first.stderr == ""  # --quiet


def test_cli_second_run_skips_finished_solvers_and_reproduces_the_table(cli_run):
    out, first, second, stamps = cli_run
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("finished earlier, skipped") == 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps
    assert second.stdout == first.stdout


def test_table_only_reassembles_the_same_table(cli_run, tmp_path):
    out, _, _, _ = cli_run
    before = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    (out / "score_vs_time.png").unlink()
    assert main(["compare", "--table-only", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text()) == before
    assert (out / "score_vs_time.png").stat().st_size > 0
    result = run_comparison(out=out, table_only=True)
    assert result.results == before and len(result.fidelity) == 2
    with pytest.raises(UsageError, match="holds no comparison"):
        run_comparison(out=tmp_path / "nothing", table_only=True)


def test_python_entry_in_process(tmp_path):
    result = run_comparison(["MAML", "Reptile"], dataset="sinusoid", meta_steps=3, meta_batch_size=2,
                            inner_steps=1, eval_tasks=4, fidelity_tasks=2, out=tmp_path, quiet=True,
                            isolate=False, chunk_size=2, threads=1)
    assert result.out == tmp_path
    assert result.results == json.loads((tmp_path / "results.json").read_text())
    assert [r["metric"] for r in result.results] == ["neg_mse", "neg_mse"]
    assert all(r["score_mean"] < 0 and r["status"] == "ok" for r in result.results)
    assert not (tmp_path / "curves_accuracy.png").exists()  # regression: no accuracy curves
    reptile = next(r for r in result.fidelity if r["method"] == "Reptile")
    assert reptile["reference"] == "unrolled" and reptile["rel_error_mean"] is None  # n/a (JSON null)
    assert -1 <= reptile["cosine_mean"] <= 1
    assert "Neg. MSE" in format_table(result.results)


def solver_dir(tmp_path, name, **overrides):
    config = _protocols.resolve("tuned", "sinusoid", [name], dict(meta_batch_size=2, inner_steps=1,
                                                                  eval_tasks=3, **overrides))
    path = tmp_path / name
    _compare._prepare_dir(path, _compare._solver_spec(config, name), force=False)
    return path, config


def load_estimator(path):
    """The fitted estimator of a solver folder, rebuilt from config.json and its meta_fit checkpoint
    (meta_steps = the checkpoint's step count, so no step runs and no file changes)."""
    spec = json.loads((path / "config.json").read_text())
    checkpoint = path / "checkpoint.pt"
    n_iter = torch.load(checkpoint, weights_only=True)["n_iter"]
    est = _compare._run_estimator(spec).set_params(meta_steps=n_iter)
    return est.meta_fit(_compare.make_samplers(spec).train, checkpoint=checkpoint)


def assert_same_training(a, b):
    assert a.n_iter_ == b.n_iter_
    for k in a.params_:
        assert torch.equal(a.params_[k], b.params_[k]), k
    assert {k: v for k, v in a.history_.items() if k != "time"} == \
        {k: v for k, v in b.history_.items() if k != "time"}


def test_interrupted_solver_resumes_bit_identically(tmp_path):
    interrupted, config = solver_dir(tmp_path / "a", "IMAML", meta_steps=7)
    assert _compare.run_solver(interrupted, chunk_size=3, max_chunks=1, quiet=True) is None
    assert load_estimator(interrupted).n_iter_ == 3 and not (interrupted / "result.json").exists()
    assert sorted(p.name for p in interrupted.iterdir()) == ["checkpoint.pt", "config.json", "state.json"]
    state = json.loads((interrupted / "state.json").read_text())
    assert state["sessions"] == 1 and state["status"] == "running" and state["peak_rss_mb"] > 10
    resumed = _compare.run_solver(interrupted, chunk_size=3, quiet=True)
    assert resumed["sessions"] == 2 and resumed["meta_steps"] == 7
    state = json.loads((interrupted / "state.json").read_text())
    assert state["sessions"] == 2 and state["status"] == "ok"
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["n_iter"] == 7

    straight_dir, _ = solver_dir(tmp_path / "b", "IMAML", meta_steps=7)
    straight = _compare.run_solver(straight_dir, chunk_size=100, quiet=True)
    assert resumed["scores"] == straight["scores"]
    assert_same_training(load_estimator(interrupted), load_estimator(straight_dir))
    # ... and equal to one plain meta_fit call with the same parameters
    train = _compare.make_samplers(config).train
    plain = fewshot.IMAML(**config["solvers"]["IMAML"]).meta_fit(train)
    assert_same_training(load_estimator(interrupted), plain)
    assert load_estimator(interrupted).get_params() == plain.get_params()


def test_a_run_records_the_cpu_instruction_sets_it_ran_on_and_says_when_it_changes(tmp_path, capsys):
    run, _ = solver_dir(tmp_path, "FOMAML", meta_steps=4)
    assert _compare.run_solver(run, chunk_size=2, max_chunks=1, quiet=False) is None
    here = torch.backends.cpu.get_cpu_capability()
    state = json.loads((run / "state.json").read_text())
    assert state["cpu_capabilities"] == [here]
    assert "resumed on" not in capsys.readouterr().out
    state["cpu_capabilities"] = ["AVX512" if here != "AVX512" else "AVX2"]  # as if it began elsewhere
    (run / "state.json").write_text(json.dumps(state))
    result = _compare.run_solver(run, chunk_size=2, quiet=False)
    assert f"FOMAML: resumed on a {here} CPU after {state['cpu_capabilities'][0]}" in capsys.readouterr().out
    assert result["cpu_capabilities"] == [state["cpu_capabilities"][0], here]


def test_solver_warnings_are_summarised_once_per_session_not_per_chunk(tmp_path):
    # An undamped series with lam far below the curvature diverges at every meta-step.
    config = _protocols.resolve("tuned", "sinusoid", ["NeumannMAML"],
                                dict(meta_batch_size=2, inner_steps=1, eval_tasks=3, meta_steps=6),
                                {"NeumannMAML": {"lam": 0.01, "neumann_lr": 1.0}})
    path = tmp_path / "NeumannMAML"
    _compare._prepare_dir(path, _compare._solver_spec(config, "NeumannMAML"), force=False)
    with pytest.warns(SolverWarning) as record:
        result = _compare.run_solver(path, chunk_size=2, quiet=True)
    assert result["status"] == "ok"
    messages = [str(w.message) for w in record if issubclass(w.category, SolverWarning)]
    assert len(messages) == 1 and "Neumann series diverged" in messages[0], messages


def test_killed_comparison_resumes_where_it_stopped(tmp_path):
    args = ["--solvers", "FOMAML", "--meta-steps", "80", "--meta-batch-size", "2", "--inner-steps", "1",
            "--eval-tasks", "3", "--chunk-size", "4", "--fidelity-tasks", "0", "--threads", "1",
            "--quiet", "--in-process", "--out", "out"]
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "compare", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "out" / "FOMAML" / "checkpoint.pt"
    sigkill_once_written(proc, checkpoint)
    done = load_estimator(checkpoint.parent).n_iter_
    assert 0 < done < 80 and done % 4 == 0
    assert main(["compare", *args[:-3], "--in-process", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((checkpoint.parent / "result.json").read_text())
    assert result["sessions"] == 2 and result["meta_steps"] == 80
    config = _protocols.resolve("tuned", "sinusoid", ["FOMAML"],
                                dict(meta_steps=80, meta_batch_size=2, inner_steps=1))
    plain = fewshot.FOMAML(**config["solvers"]["FOMAML"]).meta_fit(_compare.make_samplers(config).train)
    assert_same_training(load_estimator(checkpoint.parent), plain)


def test_a_folder_of_the_earlier_checkpoint_format_is_refused(tmp_path, capsys):
    import joblib

    kw = dict(dataset="sinusoid", meta_steps=2, meta_batch_size=2, inner_steps=1, eval_tasks=3,
              fidelity_tasks=0, out=tmp_path, quiet=True, isolate=False, threads=1)
    path, _ = solver_dir(tmp_path, "FOMAML", meta_steps=2)  # the config.json an earlier run wrote
    old = path / "checkpoint.joblib"
    joblib.dump({"format": 1, "estimator": fewshot.FOMAML(), "sessions": 1, "status": "running"}, old)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(UsageError) as exc:
        run_comparison(["FOMAML"], **kw)
    message = str(exc.value)
    assert str(old) in message and "earlier" in message
    assert f"delete the run directory {path}" in message and "--out" in message
    with pytest.raises(UsageError, match="checkpoint.joblib"):
        _compare.run_solver(path, quiet=True)  # the worker refuses it too
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--solvers", "FOMAML", "--dataset", "sinusoid", "--meta-steps", "2",
              "--meta-batch-size", "2", "--inner-steps", "1", "--eval-tasks", "3", "--fidelity-tasks",
              "0", "--threads", "1", "--quiet", "--in-process", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "checkpoint.joblib" in capsys.readouterr().err
    assert sorted(p.name for p in path.iterdir()) == before  # nothing started over
    assert load_results(tmp_path)[0]["status"].startswith("earlier format")
    result = run_comparison(["FOMAML"], force=True, **kw)  # --force discards it
    assert result.results[0]["status"] == "ok" and not old.exists() and (path / "checkpoint.pt").exists()


def test_changed_settings_are_refused_unless_forced(tmp_path):
    kw = dict(dataset="sinusoid", meta_batch_size=2, inner_steps=1, eval_tasks=3, fidelity_tasks=0,
              out=tmp_path, quiet=True, isolate=False, threads=1)
    run_comparison(["FOMAML"], meta_steps=3, **kw)
    with pytest.raises(UsageError, match="meta_steps"):  # fewer steps than the run already made
        run_comparison(["FOMAML"], meta_steps=2, **kw)
    with pytest.raises(UsageError, match="inner_lr"):
        run_comparison(["FOMAML"], meta_steps=3, inner_lr=0.123, **kw)
    result = run_comparison(["FOMAML"], meta_steps=2, force=True, **kw)
    assert result.results[0]["meta_steps"] == 2


def test_more_meta_steps_extend_a_finished_run_exactly(tmp_path):
    kw = dict(dataset="sinusoid", meta_batch_size=2, inner_steps=1, eval_tasks=3, fidelity_tasks=0,
              quiet=True, isolate=False, threads=1, chunk_size=2)
    run_comparison(["FOMAML"], meta_steps=3, out=tmp_path / "a", **kw)
    run_comparison(["FOMAML"], meta_steps=7, out=tmp_path / "a", **kw)
    run_comparison(["FOMAML"], meta_steps=7, out=tmp_path / "b", **kw)
    extended, straight = (json.loads((tmp_path / d / "FOMAML" / "result.json").read_text()) for d in "ab")
    assert extended["meta_steps"] == 7 and extended["sessions"] == 2
    assert extended["scores"] == straight["scores"]
    assert_same_training(load_estimator(tmp_path / "a" / "FOMAML"), load_estimator(tmp_path / "b" / "FOMAML"))


def test_other_scoring_settings_score_a_finished_run_again_without_training_it(tmp_path):
    """Test-time adaptation steps and the evaluation pool only decide how a run is scored: asked for
    with other values, a finished run is scored again from its checkpoint, as a run made with them."""
    kw = dict(dataset="sinusoid", meta_batch_size=2, inner_steps=1, fidelity_tasks=0, quiet=True,
              isolate=False, threads=1, chunk_size=2)
    steps = lambda n: {"set_params": {"*": {"adapt_steps": n}}}
    result = lambda d: json.loads((tmp_path / d / "FOMAML" / "result.json").read_text())
    run_comparison(["FOMAML"], meta_steps=3, eval_tasks=3, out=tmp_path / "a", **kw)
    first, trained = result("a"), load_estimator(tmp_path / "a" / "FOMAML")
    run_comparison(["FOMAML"], meta_steps=3, eval_tasks=5, out=tmp_path / "a", **kw, **steps(4))
    run_comparison(["FOMAML"], meta_steps=3, eval_tasks=5, out=tmp_path / "b", **kw, **steps(4))
    again, straight = result("a"), result("b")
    assert again["scores"] == straight["scores"] and len(again["scores"]) == 5
    assert again["train_time_s"] == first["train_time_s"] and again["sessions"] == 2  # not trained again
    assert_same_training(load_estimator(tmp_path / "a" / "FOMAML"), trained)
    config = json.loads((tmp_path / "a" / "FOMAML" / "config.json").read_text())
    assert (config["eval_tasks"], config["params"]["adapt_steps"]) == (5, 4)
    # more meta-steps and another scoring at once: the run continues exactly and is scored again
    run_comparison(["FOMAML"], meta_steps=5, eval_tasks=5, out=tmp_path / "a", **kw, **steps(2))
    run_comparison(["FOMAML"], meta_steps=5, eval_tasks=5, out=tmp_path / "c", **kw, **steps(2))
    assert result("a")["scores"] == result("c")["scores"] and result("a")["meta_steps"] == 5
    assert_same_training(load_estimator(tmp_path / "a" / "FOMAML"), load_estimator(tmp_path / "c" / "FOMAML"))
    with pytest.raises(UsageError, match="inner_lr"):  # a change to training is still refused
        run_comparison(["FOMAML"], meta_steps=5, eval_tasks=5, inner_lr=0.123, out=tmp_path / "a", **kw)


def test_divergence_is_a_row_not_a_crash(tmp_path):
    result = run_comparison(["FOMAML", "FineTune"], dataset="sinusoid", meta_steps=6, meta_batch_size=2,
                            inner_steps=3, set_params={"FOMAML": {"inner_lr": 1e4}}, eval_tasks=3,
                            fidelity_tasks=0, out=tmp_path, quiet=True, isolate=False, threads=1)
    fomaml, finetune = result.results
    assert fomaml["status"].startswith("diverged at meta-step") and fomaml["score_mean"] is None
    assert finetune["status"] == "ok"
    assert "diverged at meta-step" in format_table(result.results)
    assert (tmp_path / "score_vs_time.png").stat().st_size > 0
    # the history up to the last finite step is kept, and the status is in state.json
    path = tmp_path / "FOMAML"
    step = int(fomaml["status"].rsplit(" ", 1)[1])
    history = json.loads((path / "history.json").read_text())
    assert all(len(v) == step - 1 for v in history.values())
    assert json.loads((path / "state.json").read_text())["status"] == fomaml["status"]


def test_an_unfinished_diverged_run_diverges_again_at_the_same_step(tmp_path, monkeypatch):
    step = fewshot.FOMAML._step

    def nan_from_step_5(self, *args):  # a meta-gradient that turns non-finite after a checkpoint
        grads, stats = step(self, *args)
        return ({k: v * float("nan") for k, v in grads.items()} if self.n_iter_ >= 4 else grads), stats

    monkeypatch.setattr(fewshot.FOMAML, "_step", nan_from_step_5)
    path, _ = solver_dir(tmp_path, "FOMAML", meta_steps=9)
    first = _compare.run_solver(path, chunk_size=2, quiet=True)
    assert first["status"] == "diverged at meta-step 5" and first["meta_steps"] == 4
    assert torch.load(path / "checkpoint.pt", weights_only=True)["n_iter"] == 4
    history = json.loads((path / "history.json").read_text())
    assert all(len(v) == 4 for v in history.values())
    (path / "result.json").unlink()  # as if killed before the result was written
    again = _compare.run_solver(path, chunk_size=2, quiet=True)  # from the checkpoint, once more
    assert again["status"] == first["status"] and again["sessions"] == 2
    assert json.loads((path / "history.json").read_text()) == history  # no step re-ran past it


def test_crashing_solver_does_not_stop_the_others(tmp_path):
    res = run_cli(["--dataset", "sinusoid", "--solvers", "Reptile,FineTune", "--set", "Reptile.model=conv4",
                   "--meta-steps", "2", "--eval-tasks", "2", "--fidelity-tasks", "0", "--quiet",
                   "--out", "out"], tmp_path)
    assert res.returncode == 1
    assert "conv4" in (tmp_path / "out" / "Reptile" / "error.txt").read_text()
    rows = load_results(tmp_path / "out")
    assert rows[0]["method"] == "Reptile" and rows[0]["status"].startswith("failed: ValueError")
    assert rows[1]["status"] == "ok"


@pytest.mark.parametrize("argv, message", [
    (["--solvers", "MAML,Nope"], "unknown solver"),
    (["--dataset", "sinusoid", "--split", "lake"], "split does not apply"),
    (["--set", "MAML.no_such=1"], "no parameter 'no_such'"),
    (["--inner-lr", "-1"], "inner_lr must be > 0"),
])
def test_cli_rejects_bad_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_protocol_is_table_1():
    config = _protocols.resolve("report", "omniglot", list(fewshot.SOLVERS))
    assert (config["n_way"], config["k_shot"], config["n_query"], config["eval_query"],
            config["eval_tasks"], config["split"]) == (5, 1, 15, 15, 600, "vinyals")
    s = config["solvers"]
    for name in ("MAML", "FOMAML", "Reptile", "IMAML", "NeumannMAML", "PenaltyMAML"):
        p = s[name]
        assert (p["inner_lr"], p["inner_steps"], p["meta_lr"], p["meta_batch_size"], p["meta_steps"],
                p["meta_optimizer"]) == (0.01, 5, 1e-3, 16, 2000, "adam"), name
    assert (s["NeumannMAML"]["neumann_terms"], s["NeumannMAML"]["neumann_lr"]) == (4, 1.0)
    assert (s["IMAML"]["lam"], s["IMAML"]["cg_steps"]) == (1.0, 5)
    assert s["PenaltyMAML"]["penalty"] == 0.1 and s["Reptile"]["outer_stepsize"] == 1e-3
    assert s["FineTune"] == dict(meta_steps=2000, meta_lr=1e-3, meta_optimizer="adam", batch_size=64,
                                 inner_steps=100, inner_lr=0.1, device="auto", random_state=0)
    for name, params in s.items():  # every value is a valid parameter of its estimator
        fewshot.SOLVERS[name](**params)._validate_params()


def test_tuned_protocol_precedence_and_overrides():
    # The tuned numbers will change; the order in which the table's parts apply must not.
    table = _protocols.PROTOCOLS["tuned"]
    names = ["MAML", "IMAML", "PenaltyMAML", "Reptile", "FineTune"]
    config = _protocols.resolve("tuned", "omniglot", names)
    shared = {**table["shared"], **table["datasets"]["omniglot"]["shared"]}
    assert config["n_query"] == shared["n_query"] and config["eval_query"] == 15
    s = config["solvers"]
    for name in names[:3]:
        # shared < general solver entry < per-dataset solver entry; a query size lands in solver_tasks
        expected = {**{k: shared[k] for k in ("inner_lr", "adapt_steps", "meta_lr")},
                    **table["solvers"].get(name, {}),
                    **table["datasets"]["omniglot"].get("solvers", {}).get(name, {})}
        for key, value in expected.items():
            got = config["solver_tasks"].get(name, {}) if key in _protocols.SOLVER_TASK_KEYS else s[name]
            assert got[key] == value, (name, key)
    sinusoid = _protocols.resolve("tuned", "sinusoid", ["IMAML"])["solvers"]["IMAML"]
    assert sinusoid["lam"] == table["datasets"]["sinusoid"]["solvers"]["IMAML"]["lam"]
    assert sinusoid["inner_lr"] == table["datasets"]["sinusoid"]["shared"]["inner_lr"]
    over = _protocols.resolve("tuned", "omniglot", ["IMAML", "Reptile", "FineTune"],
                              dict(inner_steps=3, inner_lr=0.1, meta_lr=0.01, meta_steps=7, seed=5),
                              {"*": {"adapt_steps": 4}, "IMAML": {"lam": 2.0}})
    s = over["solvers"]
    assert (s["IMAML"]["inner_steps"], s["IMAML"]["inner_lr"], s["IMAML"]["lam"]) == (3, 0.1, 2.0)
    assert s["Reptile"]["outer_stepsize"] == 0.01 and s["Reptile"]["meta_lr"] == 0.01
    # FineTune's inner settings fit its head: shared inner options leave them alone
    finetune = s["FineTune"]
    assert (finetune["inner_steps"], finetune["inner_lr"], finetune["meta_steps"]) == (100, 0.1, 7)
    assert all(p["random_state"] == 5 and p["adapt_steps"] == 4 for p in s.values())


def test_a_task_setting_amends_the_dataset_entries(monkeypatch):
    # datasets[d]["settings"]["<n>w<k>s"]: its shared values win over the dataset's solver entries,
    # its solver entries over both, and the command line over all of them.
    table = copy.deepcopy(_protocols.PROTOCOLS)
    omniglot = table["tuned"]["datasets"]["omniglot"]
    omniglot["settings"]["20w5s"] = {"shared": {"n_query": 2, "inner_steps": 3},
                                     "solvers": {"FOMAML": {"inner_steps": 4, "n_query": 6}}}
    monkeypatch.setattr(_protocols, "PROTOCOLS", table)
    names = ["MAML", "FOMAML", "ANIL"]
    base = _protocols.resolve("tuned", "omniglot", names)
    assert base["solver_tasks"]["MAML"]["n_query"] == omniglot["solvers"]["MAML"]["n_query"] == 15
    config = _protocols.resolve("tuned", "omniglot", names, {"n_way": 20, "k_shot": 5})
    assert (config["n_way"], config["k_shot"], config["n_query"]) == (20, 5, 2)
    assert config["solver_tasks"] == {"FOMAML": {"n_query": 6}}
    s = config["solvers"]
    assert (s["MAML"]["inner_steps"], s["ANIL"]["inner_steps"], s["FOMAML"]["inner_steps"]) == (3, 3, 4)
    assert s["MAML"]["inner_lr"] == base["solvers"]["MAML"]["inner_lr"]  # what the setting leaves alone
    over = _protocols.resolve("tuned", "omniglot", names, {"n_way": 20, "k_shot": 5, "n_query": 7,
                                                           "inner_steps": 8})
    assert over["solver_tasks"] == {} and over["n_query"] == 7
    assert {p["inner_steps"] for p in over["solvers"].values()} == {8}
    # the shipped settings: 20-way 1-shot trains every solver on one query per class
    shipped = _protocols.resolve("tuned", "omniglot", list(fewshot.SOLVERS), {"n_way": 20})
    assert shipped["n_query"] == 1 and shipped["solver_tasks"] == {}
    assert _protocols.setting_key(shipped) == "20w1s"
    assert _protocols.setting_key(_protocols.resolve("tuned", "sinusoid", ["MAML"])) is None
    for name, params in shipped["solvers"].items():
        fewshot.SOLVERS[name](**params)._validate_params()


def test_the_shipped_omniglot_settings():
    solvers = list(fewshot.SOLVERS)
    by_key = {(n, k): _protocols.resolve("tuned", "omniglot", solvers, {"n_way": n, "k_shot": k})
              for n in (5, 20) for k in (1, 5)}
    assert {_protocols.setting_key(c) for c in by_key.values()} == {"5w1s", "5w5s", "20w1s", "20w5s"}
    # 5-way 5-shot takes the 5-way 1-shot entries as they are
    assert by_key[5, 5]["solvers"] == by_key[5, 1]["solvers"]
    assert by_key[5, 5]["solver_tasks"] == by_key[5, 1]["solver_tasks"] != {}
    # 20-way trains every solver on one query per class, and the report's loop takes steps of 0.1
    for k in (1, 5):
        twenty, five = by_key[20, k]["solvers"], by_key[5, 1]["solvers"]
        assert by_key[20, k]["n_query"] == 1 and by_key[20, k]["solver_tasks"] == {}
        stepped = {name for name in solvers if twenty[name] != five[name]}
        assert stepped == {"MAML", "FOMAML", "IMAML", "NeumannMAML"}
        for name in stepped:
            # IMAML adapts at test as it trains (its 5-way 20 steps are for steps of 0.01)
            test_steps = {"adapt_steps": None} if name == "IMAML" else {}
            assert five[name]["inner_lr"] == 0.01
            assert twenty[name] == {**five[name], "inner_lr": 0.1, **test_steps}
        assert five["IMAML"]["adapt_steps"] == 20


def test_a_solver_entry_sets_its_own_training_query_size(tmp_path, monkeypatch):
    table = copy.deepcopy(_protocols.PROTOCOLS)
    table["tuned"]["datasets"]["sinusoid"]["solvers"]["FOMAML"] = {"n_query": 3, "inner_steps": 2}
    monkeypatch.setattr(_protocols, "PROTOCOLS", table)
    config = _protocols.resolve("tuned", "sinusoid", ["MAML", "FOMAML"])
    assert config["solver_tasks"] == {"FOMAML": {"n_query": 3}}
    assert "n_query" not in config["solvers"]["FOMAML"] and config["solvers"]["FOMAML"]["inner_steps"] == 2
    run_comparison(["MAML", "FOMAML"], dataset="sinusoid", meta_steps=2, meta_batch_size=2, eval_tasks=2,
                   fidelity_tasks=0, quiet=True, isolate=False, threads=1, out=tmp_path / "a")
    specs = {n: json.loads((tmp_path / "a" / n / "config.json").read_text()) for n in ("MAML", "FOMAML")}
    shared = table["tuned"]["datasets"]["sinusoid"]["shared"]["n_query"]
    assert (specs["MAML"]["n_query"], specs["FOMAML"]["n_query"]) == (shared, 3)
    train, test, _ = _compare.make_samplers(specs["FOMAML"])  # what the solver's run trained on
    assert train.sample(random_state=0).query.x.shape[0] == 3
    assert test.sample(random_state=0).query.x.shape[0] == specs["FOMAML"]["eval_query"]
    # a command-line query size wins over the solver's entry, as over every protocol value
    over = _protocols.resolve("tuned", "sinusoid", ["MAML", "FOMAML"], {"n_query": 4})
    assert over["solver_tasks"] == {} and over["n_query"] == 4
    assert _compare._solver_spec(over, "FOMAML")["n_query"] == 4


def test_moving_average_and_figures():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([3.0, 1.0], 1), [3.0, 1.0])
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)
    histories = {"A": {"support_loss_pre": [3, 2, 1], "query_loss_post": [2, 1, 0.5]},
                 "B": {"train_loss": [1, 0.5]}}
    fig = plot_learning_curves(histories, kind="loss", window=2)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["A", "B"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["Train pre", "Test post"]

    def row(method, mean, ci):
        return {"method": method, "score_mean": mean, "score_ci95": ci, "train_time_s": 1.0}

    fig = plot_score_vs_time([row("A", 0.5, 0.1),
                              {"method": "B", "score_mean": None, "status": "diverged at meta-step 2"},
                              row("C", 0.98, 0.0023876), row("D", -2.24271, 0.467)])
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "A\n0.50 ± 0.10", "B", "C\n0.9800 ± 0.0024", "D\n-2.24 ± 0.47"]
    points = [{"meta_step": 0, "score_mean": 0.5, "score_ci95": 0.1},
              {"meta_step": 50, "score_mean": 0.7, "score_ci95": None}]
    fig = plot_validation_curves({"A": points, "B": []}, reference={"published": 0.958})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.7])
    with pytest.raises(ValueError, match="curves is empty"):
        plot_validation_curves({"B": []})


def test_scheduled_run_spans_all_chunks_and_is_not_extended(tmp_path):
    kw = dict(dataset="sinusoid", meta_batch_size=2, inner_steps=1, eval_tasks=3, fidelity_tasks=0,
              quiet=True, isolate=False, threads=1, set_params={"FOMAML": {"meta_lr_schedule": "linear"}})
    run_comparison(["FOMAML"], meta_steps=5, out=tmp_path / "a", chunk_size=2, **kw)
    config = json.loads((tmp_path / "a" / "FOMAML" / "config.json").read_text())
    train = _compare.make_samplers(config).train
    plain = fewshot.FOMAML(**config["params"])
    assert_same_training(load_estimator(tmp_path / "a" / "FOMAML"), plain.meta_fit(train))
    with pytest.raises(UsageError, match="other settings"):
        run_comparison(["FOMAML"], meta_steps=9, out=tmp_path / "a", chunk_size=2, **kw)


def test_finished_run_is_reused_under_another_thread_count(tmp_path):
    kw = dict(dataset="sinusoid", meta_steps=3, meta_batch_size=2, inner_steps=1, eval_tasks=3,
              fidelity_tasks=0, quiet=True, isolate=False, out=tmp_path)
    first = run_comparison(["FOMAML"], threads=1, **kw).results[0]
    again = run_comparison(["FOMAML"], threads=2, **kw).results[0]  # assembles, does not re-run
    assert again == first
    assert json.loads((tmp_path / "FOMAML" / "config.json").read_text())["threads"] == 1
    # an unfinished run is not: its remaining steps would run under other settings
    (tmp_path / "FOMAML" / "result.json").unlink()
    with pytest.raises(UsageError, match="threads"):
        run_comparison(["FOMAML"], threads=2, **kw)


def test_a_plotting_failure_never_loses_the_table(tmp_path, monkeypatch):
    from fewshot import plotting

    def broken(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plotting, "plot_learning_curves", broken)
    with pytest.warns(RuntimeWarning, match="figures were not written.*ImportError.*--table-only"):
        result = run_comparison(["FOMAML"], dataset="sinusoid", meta_steps=2, meta_batch_size=2,
                                inner_steps=1, eval_tasks=3, fidelity_tasks=0, out=tmp_path, quiet=True,
                                isolate=False, threads=1)
    assert result.results[0]["status"] == "ok"
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.json").is_file()
    assert not (tmp_path / "curves_loss.png").exists()
    monkeypatch.undo()
    run_comparison(out=tmp_path, table_only=True)  # the figures, drawn again from the files
    assert (tmp_path / "curves_loss.png").is_file() and (tmp_path / "score_vs_time.png").is_file()


@pytest.mark.skipif(not os.environ.get("FEWSHOT_DATA"), reason="needs Omniglot (FEWSHOT_DATA)")
def test_omniglot_rows_are_scored_on_validation_and_test_characters(tmp_path):
    """Omniglot runs are scored on the split's test characters (the table's score) and on its
    validation characters (the column protocols are chosen on), each on its own fixed pool."""
    result = run_comparison(["FOMAML"], dataset="omniglot", out=tmp_path, meta_steps=2, meta_batch_size=2,
                            inner_steps=1, eval_tasks=4, eval_query=2, fidelity_tasks=0, quiet=True,
                            isolate=False, set_params={"*": {"adapt_steps": 1}})
    row = result.results[0]
    assert 0 <= row["val_score_mean"] <= 1 and 0 <= row["score_mean"] <= 1
    assert row["val_score_mean"] != row["score_mean"] or row["val_score_ci95"] != row["score_ci95"]
    header = format_table(result.results).splitlines()[0]
    assert "Accuracy (%) +- 95% CI  Validation" in header
    assert read_csv(tmp_path / "results.csv")[0]["val_score_mean"] != ""
    samplers = _compare.make_samplers(json.loads((tmp_path / "FOMAML" / "config.json").read_text()))
    assert samplers.val.subset == "val" and samplers.test.subset == "test"
    assert "Validation" not in format_table(run_comparison(
        ["FOMAML"], dataset="clusters", out=tmp_path / "c", meta_steps=1, meta_batch_size=2, inner_steps=1,
        eval_tasks=2, fidelity_tasks=0, quiet=True, isolate=False).results).splitlines()[0]


@pytest.mark.skipif(not os.environ.get("FEWSHOT_DATA"), reason="needs Omniglot (FEWSHOT_DATA)")
def test_validation_curve_leaves_training_as_it_is_and_survives_resume_and_extension(tmp_path):
    """--val-every: validation scores against meta-steps, from the run's starting point, on the first
    tasks of the final validation pool; training, scores and resumes are bit for bit unchanged."""
    constant = {"*": {"adapt_steps": 1, "meta_lr_schedule": "constant"}}  # a run that can be extended
    kw = dict(dataset="omniglot", meta_batch_size=2, inner_steps=1, eval_tasks=4, eval_query=2,
              fidelity_tasks=0, quiet=True, isolate=False, chunk_size=2, set_params=constant)
    curve = lambda d: json.loads((tmp_path / d / "FOMAML" / "val_curve.json").read_text())
    plain = run_comparison(["FOMAML"], meta_steps=4, out=tmp_path / "plain", **kw).results[0]
    solver = tmp_path / "a" / "FOMAML"
    config = _protocols.resolve("tuned", "omniglot", ["FOMAML"], dict(meta_steps=4, meta_batch_size=2,
                                inner_steps=1, eval_tasks=4, eval_query=2), constant)
    config["threads"] = 2
    _compare._prepare_dir(solver, _compare._solver_spec(config, "FOMAML"), force=False)
    assert _compare.run_solver(solver, chunk_size=2, quiet=True, max_chunks=1, val_every=2, val_tasks=3) is None
    assert [p["meta_step"] for p in curve("a")["points"]] == [0, 2]  # interrupted after one chunk
    with_curve = run_comparison(["FOMAML"], meta_steps=4, out=tmp_path / "a", val_every=2, val_tasks=3,
                                **kw).results[0]
    assert with_curve["score_mean"] == plain["score_mean"]
    assert with_curve["val_score_mean"] == plain["val_score_mean"]
    assert_same_training(load_estimator(solver), load_estimator(tmp_path / "plain" / "FOMAML"))
    saved = curve("a")
    assert (saved["n_tasks"], saved["every"]) == (3, 2)
    assert [p["meta_step"] for p in saved["points"]] == [0, 2, 4]
    assert all(0 <= p["score_mean"] <= 1 and p["score_ci95"] >= 0 for p in saved["points"])
    # the last point is the first 3 tasks of the 4-task validation pool that scores the finished run
    est = load_estimator(solver)
    samplers = _compare.make_samplers(json.loads((solver / "config.json").read_text()))
    assert saved["points"][-1]["score_mean"] == _compare._evaluate(est, samplers.val, 3, 0)[0]
    assert (tmp_path / "a" / "curves_validation.png").stat().st_size > 0
    # extending a constant-rate run continues the curve from the finished run's point
    run_comparison(["FOMAML"], meta_steps=6, out=tmp_path / "a", val_every=2, val_tasks=3, **kw)
    assert [p["meta_step"] for p in curve("a")["points"]] == [0, 2, 4, 6]
    assert curve("a")["points"][:3] == saved["points"]
    rescored = {**kw, "set_params": {"*": {**constant["*"], "adapt_steps": 2}}}  # its points used 1
    with pytest.raises(UsageError, match=r"val_curve.json was scored with .*adapt_steps: 1 -> 2"):
        run_comparison(["FOMAML"], meta_steps=6, out=tmp_path / "a", val_every=2, val_tasks=3, **rescored)
    for bad, match in [(dict(val_every=3), "must be a multiple of chunk_size=2"),
                       (dict(val_every=-2), "val_every must be an integer >= 0"),
                       (dict(val_every=2, dataset="sinusoid"), "needs a task family with a validation split")]:
        with pytest.raises(UsageError, match=match):
            run_comparison(["FOMAML"], meta_steps=4, out=tmp_path / "bad", **{**kw, **bad})
    other = tmp_path / "c" / "FOMAML"  # an unfinished run resumed with another pool size is refused
    _compare._prepare_dir(other, _compare._solver_spec(config, "FOMAML"), force=False)
    _compare.run_solver(other, chunk_size=2, quiet=True, max_chunks=1, val_every=2, val_tasks=3)
    with pytest.raises(UsageError, match=r"scored on 3 validation tasks .*--val-tasks"):
        _compare.run_solver(other, chunk_size=2, quiet=True, val_every=2, val_tasks=5)


def test_folder_dataset_compares_on_class_disjoint_splits(tmp_path, monkeypatch):
    """`--dataset folder --data-dir PATH`: the folder's class groups split train / validation /
    test from a seed, every row scored on test and validation classes, resumable like any run."""
    pytest.importorskip("PIL")
    from _util import make_folder

    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    layout = {f"{group}/{c}": 6 for group in ("a", "b", "c", "d", "e") for c in ("x", "y")}
    make_folder(tmp_path / "images", layout, mode="RGB", size=(20, 20))
    kw = dict(dataset="folder", data_dir=tmp_path / "images", n_way=2, n_query=2, eval_query=2,
              image_size=16, meta_steps=2, meta_batch_size=2, inner_steps=1, eval_tasks=3, fidelity_tasks=0,
              quiet=True, isolate=False)
    result = run_comparison(["FOMAML", "ANIL"], out=tmp_path / "out", **kw)
    assert [r["status"] for r in result.results] == ["ok", "ok"]
    assert all(r["val_score_mean"] is not None for r in result.results)
    config = json.loads((tmp_path / "out" / "FOMAML" / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path / "images") and config["mode"] == "RGB"
    samplers = _compare.make_samplers(config)
    groups = [{n.split("/")[0] for n in s.class_names} for s in samplers]
    assert [len(g) for g in groups] == [3, 1, 1]  # 20% of 5 groups each for test and validation
    assert groups[0].isdisjoint(groups[1] | groups[2]) and groups[1].isdisjoint(groups[2])
    assert samplers.train.input_shape == (3, 16, 16) and samplers.test.n_query == 2
    again = run_comparison(["FOMAML"], out=tmp_path / "out", **kw)  # finished: read back, not rerun
    assert again.results[0]["score_mean"] == result.results[0]["score_mean"]
    for bad, match in [(dict(data_dir=None), "needs data_dir"),
                       (dict(data_dir=tmp_path / "nowhere"), "is not a folder"),
                       (dict(test_size=0.9), r"val_size \+ test_size must leave classes")]:
        with pytest.raises(UsageError, match=match):
            run_comparison(["FOMAML"], out=tmp_path / "bad", **{**kw, **bad})
    with pytest.raises(UsageError, match=r"data_dir only apply to dataset='folder'"):
        run_comparison(["FOMAML"], dataset="clusters", data_dir=tmp_path, out=tmp_path / "bad")
    res = run_cli(["--dataset", "folder", "--solvers", "FOMAML"], cwd=tmp_path)
    assert res.returncode == 2 and "needs data_dir (--data-dir)" in res.stderr
    # classes too small for the evaluation's queries: one clear error before any solver runs
    with pytest.raises(UsageError, match=r"10 of the 10 classes have fewer than k_shot \+ n_query = 1 \+ 15 "
                                         r"(?s:.*)--eval-query"):
        run_comparison(["FOMAML", "MAML"], out=tmp_path / "small", **{**kw, "eval_query": 15})
    assert not (tmp_path / "small" / "FOMAML").exists()
