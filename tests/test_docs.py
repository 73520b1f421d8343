"""Every ```python block of README.md and docs/*.md runs as written, with shorter budgets.

The blocks are read from the files when the tests are collected, so the tests follow the docs. Each
block runs in a fresh interpreter (``sys.executable``) in a temporary working directory:

* A block whose first line is a comment naming a file (``# train.py``) is that file, standalone: it
  is written under that name and run as a script. If it calls ``init_process_group`` it is started
  on 2 CPU processes by ``python -m torch.distributed.run --standalone --nproc_per_node=2``.
* Every other block continues its file: it runs after all earlier such blocks of the same file, in
  one ``python -c``, as a reader pasting them one after the other into one interactive session runs
  them (like a session, and unlike a script or standard input, ``-c`` gives ``__main__`` no file, so
  worker processes started by ``spawn`` need no ``if __name__ == "__main__"`` guard).
* A block whose code (with the earlier blocks it runs after) mentions Omniglot needs the data: it
  runs when ``FEWSHOT_DATA`` names a data home holding Omniglot, and is skipped otherwise.
* A block that imports a package of ``OPTIONAL_PACKAGES`` is skipped when that package is missing.
* The only change made to the code is the budget cut of ``SHORTEN``: a keyword argument named there
  and given as an integer literal is lowered to at most its cap. Nothing else is edited.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

# keyword argument -> the most a block may ask for here: enough to run every code path once
# (a few meta-steps, a few evaluation tasks, at most the 2 workers of a small machine).
SHORTEN = {
    "meta_steps": 3,
    "n_tasks": 5,
    "eval_tasks": 5,
    "n_jobs": 2,
}
SHORTEN_RE = re.compile(r"\b(" + "|".join(SHORTEN) + r")=(\d+)\b")

# packages the docs show that are not dependencies, not even of the tests
OPTIONAL_PACKAGES = ("dask",)
OPTIONAL_IMPORT_RE = re.compile(r"^\s*(?:from|import)\s+((?:" + "|".join(OPTIONAL_PACKAGES) + r")\b[\w.]*)",
                                re.MULTILINE)

FENCE_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
FILE_COMMENT_RE = re.compile(r"\A#\s*([\w.-]+\.py)\s*\n")
TIMEOUT = 600


def shorten(code: str) -> str:
    """Lower every budget of ``SHORTEN`` in ``code`` to at most its cap."""
    return SHORTEN_RE.sub(lambda m: f"{m[1]}={min(int(m[2]), SHORTEN[m[1]])}", code)


def doc_blocks():
    """``(id, file_name, source)`` of every python block of the docs, in order.

    ``file_name`` is the name a standalone block gives itself (else ``None``); the ``source`` of
    any other block is that block after all earlier non-standalone blocks of its file.
    """
    blocks = []
    for path in DOC_FILES:
        session = []
        for index, match in enumerate(FENCE_RE.finditer((ROOT / path).read_text()), 1):
            code = match[1]
            file_name = FILE_COMMENT_RE.match(code)
            if file_name:
                blocks.append((f"{path}:{index}", file_name[1], code))
            else:
                session.append(code)
                blocks.append((f"{path}:{index}", None, "\n".join(session)))
    return blocks


def omniglot_available() -> bool:
    """Whether ``FEWSHOT_DATA`` is set and names a data home with an Omniglot folder."""
    home = os.environ.get("FEWSHOT_DATA")
    return bool(home) and any((Path(home) / folder).is_dir() for folder in ("omniglot-py", "omniglot"))


def run(args, cwd):
    """Run ``args`` in ``cwd``; standard output and error together in ``.stdout``.

    One intra-op thread unless the code asks for more (``torch.set_num_threads``), as in the tests'
    own process (conftest.py): the docs' networks are small, and on a loaded 2-core machine a second
    intra-op thread makes them many times slower.
    """
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT)


def test_docs_have_python_blocks():
    assert any(block_id.startswith("README.md:") for block_id, _, _ in doc_blocks())


def test_shorten_lowers_budgets_only():
    code = "f(meta_steps=2000, n_tasks=600, eval_tasks=2, n_jobs=8, meta_batch_size=32, meta_steps=0)"
    short = "f(meta_steps=3, n_tasks=5, eval_tasks=2, n_jobs=2, meta_batch_size=32, meta_steps=0)"
    assert shorten(code) == short


# Shortened, every block takes under 20 s on 2 cores, so none is marked slow.
#: What a rank prints when gloo's threads abort it at interpreter exit.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.parametrize("file_name, source", [pytest.param(file_name, source, id=block_id)
                                               for block_id, file_name, source in doc_blocks()])
def test_doc_block_runs(file_name, source, tmp_path):
    if re.search("omniglot", source, re.IGNORECASE) and not omniglot_available():
        pytest.skip("needs Omniglot: set FEWSHOT_DATA to a data home holding it (docs/datasets.md)")
    for module in OPTIONAL_IMPORT_RE.findall(source):
        pytest.importorskip(module, reason=f"the block imports {module}, which is not installed")
    code = shorten(source)
    if file_name is None:
        proc = run([sys.executable, "-c", code], tmp_path)
    else:
        (tmp_path / file_name).write_text(code)
        if "init_process_group" in code:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", file_name]
            proc = run(command, tmp_path)
            if proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stdout:
                # gloo's worker threads can abort a rank at interpreter exit, after the block's work
                # and destroy_process_group are done (pytorch/pytorch#28126): seen about once in
                # four runs on a loaded 2-core machine. Run it once more; any other failure fails.
                proc = run(command, tmp_path)
        else:
            proc = run([sys.executable, file_name], tmp_path)
    numbered = "\n".join(f"{n:4d}  {line}" for n, line in enumerate(code.splitlines(), 1))
    assert proc.returncode == 0, f"the block, shortened, failed:\n{numbered}\n--- output:\n{proc.stdout}"
