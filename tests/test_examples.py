"""The example scripts: ``--help`` shows every default and trains nothing; short runs finish."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_docs import omniglot_available

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, timeout=600, env=None):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("name, defaults", [
    ("sinusoid.py", ["(default: IMAML)", "(default: 300)", "(default: 1.0)", "(default: 200)"]),
    ("omniglot.py", ["(default: MAML)", "(default: 2000)", "(default: 1)", "(default: 600)"]),
    ("own_data.py", ["(default: FOMAML)", "(default: 100)", "(default: 28)", "(default: L)",
                     "(default: 0.25)", "(default: 200)", "(default: None)"]),
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


PREDICTION_RE = re.compile(r"^  (\S+)/[^/\s]+\.png -> (\S+)$", re.MULTILINE)


def test_own_data_example_runs_on_its_synthetic_folder(tmp_path):
    import fewshot

    saved = tmp_path / "meta.pt"
    proc = run_example("own_data.py", "--meta-steps", "2", "--eval-tasks", "3", "--threads", "1",
                       "--save", str(saved))
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "no --data-dir: wrote 100 classes of 20 synthetic glyph PNGs" in out, out
    assert "100 classes, 2000 images; preprocessing: convert('L'), resize to 28x28 (lanczos)" in out, out
    assert "meta-training on 75 classes, 25 held out" in out, out
    assert "FOMAML: held-out accuracy" in out and "(95% CI, 3 tasks of 5-way 1-shot, chance 20%" in out, out
    held_out = re.search(r"support files of (.+); query file -> predicted class:", out)[1].split(", ")
    predictions = PREDICTION_RE.findall(out)
    assert [true for true, _ in predictions] == held_out, out  # one query file of each class
    assert all(predicted in held_out for _, predicted in predictions), out
    right = sum(true == predicted for true, predicted in predictions)
    assert f"{right} of 5 right" in out, out
    assert f"meta-parameters written to {saved}" in out, out
    assert isinstance(fewshot.load_meta_params(saved), fewshot.FOMAML)


def test_own_data_example_reads_a_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for group in ("north", "south"):
        for c in range(4):
            folder = tmp_path / "images" / group / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(7):
                Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    proc = run_example("own_data.py", "--data-dir", str(tmp_path / "images"), "--mode", "RGB", "--image-size",
                       "16", "--n-way", "2", "--test-size", "0.5", "--meta-steps", "1", "--eval-tasks", "2",
                       "--threads", "1", env={"FEWSHOT_CACHE": str(tmp_path / "cache")})
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "no --data-dir" not in out, out
    assert "8 classes, 56 images; preprocessing: convert('RGB'), resize to 16x16 (lanczos)" in out, out
    assert "-> float32 [3, 16, 16]" in out, out
    # class groups are the parent folders: one of the two is held out, whole
    assert "meta-training on 4 classes, 4 held out" in out, out
    predictions = PREDICTION_RE.findall(out)
    assert len(predictions) == 2 and len({p.split("/")[0] for p, _ in predictions}) == 1, out
    assert list((tmp_path / "cache" / "image_folders").glob("images-*.pt")), "the cache went elsewhere"
