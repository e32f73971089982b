"""Run a training script the way `python train_x.py --key=val ...` would, inside the test process.

Why not a subprocess: a new interpreter spends ~4.5 s on this 2-core CPU before the script does anything
(`import torch` 2.4 s, then `torch._dynamo`, which torch.optim imports on the first optimizer, 1.9 s), and
the suite starts ~30 script runs. The command line itself stays covered by real processes:
tests/test_recipes_ddp.py starts every recipe with torchrun, tests/test_configurator.py a script of its own.

What a run may change in this process is put back afterwards: sys.argv, os.environ, the working directory,
sys.excepthook and torch's thread count. An exception that escapes the script goes through whatever
sys.excepthook the script installed (model.install_error_hook prints one line for bad input), as the
interpreter would do at exit."""
import contextlib
import io
import os
import runpy
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_code(e):
    """The process exit status SystemExit(e.code) gives: None -> 0, int -> itself, anything else printed -> 1."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def run_script(script, args=(), env=None):
    """-> subprocess.CompletedProcess with returncode, stdout, stderr. `env`: variables set for this run
    only; OMP_NUM_THREADS in it also sets torch's thread count, as it would in a fresh process."""
    saved = sys.argv, dict(os.environ), os.getcwd(), sys.excepthook, torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]
    os.environ.update(env or {})
    if "OMP_NUM_THREADS" in (env or {}):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = exit_code(e)
            except Exception as e:  # noqa: BLE001 -- reported exactly as the interpreter would, then exit 1
                sys.excepthook(type(e), e, e.__traceback__)
                code = 1
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        os.chdir(saved[2])
        sys.excepthook = saved[3]
        torch.set_num_threads(saved[4])
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())

