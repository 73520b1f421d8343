"""The example scripts: ``--help`` shows every default and trains nothing; short runs finish."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_docs import omniglot_available

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.mark.parametrize("name, defaults", [
    ("sinusoid.py", ["(default: IMAML)", "(default: 300)", "(default: 1.0)", "(default: 200)"]),
    ("omniglot.py", ["(default: MAML)", "(default: 2000)", "(default: 1)", "(default: 600)"]),
])
def test_help_shows_defaults_and_does_not_train(name, defaults):
    start = time.perf_counter()
    proc = run_example(name, "--help", timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("usage:"), proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines to the terminal's width
    for default in defaults:
        assert default in text, proc.stdout
    options = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  --")]
    assert {"--solver", "--meta-steps", "--seed", "--threads", "--eval-tasks"} <= set(options), options
    assert text.count("(default:") == len(options), "an option without its default:\n" + proc.stdout
    assert re.search(r"takes about [\w.,]+ (seconds|minutes) on a 2-core CPU", text), "how long it takes"
    assert "step/s" not in text and "s/step" not in text, "--help started training"
    # imports only: a trained default would take minutes
    assert elapsed < 60, f"--help took {elapsed:.0f} s"


def test_sinusoid_example_runs():
    proc = run_example("sinusoid.py", "--meta-steps", "3", "--eval-tasks", "5")
    assert proc.returncode == 0, proc.stdout
    assert "IMAML: query MSE on a new task after adaptation:" in proc.stdout, proc.stdout
    assert "(95% CI, 5 tasks)" in proc.stdout, proc.stdout


def test_omniglot_example_runs():
    if not omniglot_available():
        pytest.skip("needs Omniglot: set FEWSHOT_DATA to a data home holding it (docs/datasets.md)")
    proc = run_example("omniglot.py", "--meta-steps", "2", "--eval-tasks", "3", "--threads", "1")
    assert proc.returncode == 0, proc.stdout
    assert "MAML: meta-test accuracy" in proc.stdout and "3 tasks" in proc.stdout, proc.stdout
