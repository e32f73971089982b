"""configurator.py: nanoGPT-style overrides, strict: unknown keys name the closest key (command line and config
files), types are checked (int accepted for float), literals parse (--flag=False is False), --help lists keys."""
import os
import subprocess
import sys
import textwrap

import pytest

from configurator import ConfigError, config_keys, configure, help_text, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(learning_rate=3e-4, max_steps=100, batch_size=8, compile=True, out_dir="out", init_from="scratch",
                betas=(0.9, 0.95), eval_splits=["val"], wandb_run_name=None)


def test_defaults_unchanged_without_args():
    assert parse_args(DEFAULTS, []) == DEFAULTS


def test_literals_parse():
    v = parse_args(DEFAULTS, ["--compile=False", "--max_steps=7", "--learning_rate=1e-3", "--betas=(0.8,0.99)",
                              "--out_dir=out/run1", "--init_from=hf:owner/name", "--eval_splits=['val','test']"])
    assert v["compile"] is False
    assert v["max_steps"] == 7 and isinstance(v["max_steps"], int)
    assert v["learning_rate"] == 1e-3
    assert v["betas"] == (0.8, 0.99) and isinstance(v["betas"], tuple)
    assert v["out_dir"] == "out/run1" and v["init_from"] == "hf:owner/name"
    assert v["eval_splits"] == ["val", "test"]
    assert parse_args(DEFAULTS, ["--compile=True"])["compile"] is True
    assert parse_args(DEFAULTS, ["--betas=[0.5,0.6]"])["betas"] == (0.5, 0.6)  # list -> the default's tuple type
    assert parse_args(DEFAULTS, ["--out_dir=2024"])["out_dir"] == "2024"  # string keys take the text as written
    assert parse_args(DEFAULTS, ["--wandb_run_name=abc"])["wandb_run_name"] == "abc"  # None default: anything


def test_int_accepted_for_float():
    v = parse_args(DEFAULTS, ["--learning_rate=1"])
    assert v["learning_rate"] == 1.0 and isinstance(v["learning_rate"], float)


@pytest.mark.parametrize("arg,expect", [
    ("--max_steps=1.5", "max_steps.*int.*float"),
    ("--max_steps=True", "max_steps.*int.*bool"),   # a bool is not an int here
    ("--compile=1", "compile.*bool.*int"),
    ("--compile=yes", "compile.*bool.*str"),
    ("--learning_rate=fast", "learning_rate.*float.*str"),
    ("--betas=0.9", "betas.*tuple"),
    ("--betas=('a','b')", r"betas\[0\].*float.*str"),  # a tuple's elements have the default's element type
    ("--max_steps=None", "max_steps.*int.*NoneType"),  # None only where the default is None (it crashed later)
    ("--compile=None", "compile.*bool.*NoneType"),      # (and turned compile off silently)
])
def test_wrong_type_rejected(arg, expect):
    with pytest.raises(ConfigError, match=expect):
        parse_args(DEFAULTS, [arg])


@pytest.mark.parametrize("arg", ["--max_steps=0", "--batch_size=0", "--log_interval=0", "--eval_interval=-5", "--n_eval=0"])
def test_shared_counts_must_be_positive(arg):
    # step % log_interval with 0 was a ZeroDivisionError deep in the loop; an empty eval a numpy stack error
    defaults = dict(DEFAULTS, log_interval=25, eval_interval=250, n_eval=500)
    with pytest.raises(ConfigError, match=f"'{arg[2:].split('=')[0]}' must be >= 1, got {arg.split('=')[1]}"):
        parse_args(defaults, [arg])
    assert parse_args(dict(defaults, batch_size=0), ["--batch_size=0"])["batch_size"] == 0  # 0 by default: allowed


def test_unknown_key_on_command_line_names_closest():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        parse_args(DEFAULTS, ["--learning_rat=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'zzzz'"):
        parse_args(DEFAULTS, ["--zzzz=1"])


def test_config_file_applied_and_checked(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\nfrom math import pi\nmax_steps = 50\nlearning_rate = 2 * 1e-4\ncompile = False\n"
                    "_private = 3\nbatch_size: int = 4\nbatch_size *= 2\n")
    v = parse_args(DEFAULTS, [str(good)])
    assert v["max_steps"] == 50 and v["learning_rate"] == 2e-4 and v["compile"] is False and v["batch_size"] == 8
    # an imported name (pi) is not a config key; the file's assignments are
    # the command line comes after the file and wins
    assert parse_args(DEFAULTS, [str(good), "--max_steps=3"])["max_steps"] == 3

    typo = tmp_path / "typo.py"
    typo.write_text("max_step = 50\n")
    with pytest.raises(ConfigError, match=f"'max_step' in {typo}.*did you mean 'max_steps'"):
        parse_args(DEFAULTS, [str(typo)])

    wrong = tmp_path / "wrong.py"
    wrong.write_text("batch_size = '8'\n")
    with pytest.raises(ConfigError, match="batch_size.*int.*str"):
        parse_args(DEFAULTS, [str(wrong)])


@pytest.mark.parametrize("text, expect", [("max_steps = fifty\n", r"line 1: NameError: name 'fifty'"),
                                         ("compile = False\nmax_steps = (5\n", "line 2: SyntaxError")])
def test_config_file_with_a_python_error_is_one_config_error(tmp_path, text, expect):
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {bad}, {expect}"):
        parse_args(DEFAULTS, [str(bad)])


def test_missing_config_file_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.py"):
        parse_args(DEFAULTS, [str(tmp_path / "nope.py")])


def test_flag_without_value_rejected():
    with pytest.raises(ConfigError, match="--key=value"):
        parse_args(DEFAULTS, ["--compile"])


def test_configure_updates_globals_and_exits_cleanly_on_error(capsys):
    globs = dict(DEFAULTS, __file__="train_x.py", _hidden=1, helper=len)
    assert set(config_keys(globs)) == set(DEFAULTS)
    cfg = configure(globs, ["--max_steps=5"])
    assert globs["max_steps"] == 5 and cfg["max_steps"] == 5
    assert "max_steps=5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        configure(dict(DEFAULTS), ["--max_stepz=5"])
    assert "did you mean 'max_steps'" in str(e.value.code)  # a message, i.e. exit status 1, no traceback


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        configure(dict(DEFAULTS, __file__="train_x.py"), ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train_x.py" in out
    for k, v in DEFAULTS.items():
        assert f"--{k}" in out and repr(v) in out
    assert help_text({}, "x.py")  # no keys: still a usage line


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from configurator import configure
    learning_rate = 3e-4
    max_steps = 10
    compile = True
    out_dir = "out"
    config = configure(globals())
    print("RESULT", max_steps, compile, learning_rate, out_dir)
""")


def run_script(tmp_path, *args):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.format(root=ROOT))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)


def test_script_end_to_end(tmp_path):
    r = run_script(tmp_path, "--max_steps=3", "--compile=False", "--learning_rate=1")
    assert r.returncode == 0, r.stderr
    assert "RESULT 3 False 1.0 out" in r.stdout

    r = run_script(tmp_path, "--help")
    assert r.returncode == 0
    for key in ("--learning_rate", "--max_steps", "--compile", "--out_dir"):
        assert key in r.stdout
    assert "0.0003" in r.stdout and "'out'" in r.stdout

    cfg = tmp_path / "cfg.py"
    cfg.write_text("max_step = 4\n")
    for args, expect in [(["--learnin_rate=1"], "did you mean 'learning_rate'"),
                         ([str(cfg)], "did you mean 'max_steps'"),
                         (["--max_steps=x"], "expects int"),
                         (["missing_cfg.py"], "config file not found: missing_cfg.py")]:
        r = run_script(tmp_path, *args)
        assert r.returncode != 0 and "RESULT" not in r.stdout
        assert expect in r.stderr
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr  # one clear line


@pytest.mark.parametrize("args", [["--loss=mse"], ["--n_layr=2"]])
def test_in_process_runner_reports_as_the_interpreter_does(args):
    """tests/inprocess.py runs the recipes inside the test process; for bad input (an InputError through the
    script's excepthook, a config error through sys.exit(str)) it must give what a real
    `python train_pointer.py ...` gives, and leave this process as it found it."""
    import torch
    from inprocess import run_script as run_in_process
    argv, env, threads = list(sys.argv), dict(os.environ), torch.get_num_threads()
    mine = run_in_process("train_pointer.py", args, env=dict(OMP_NUM_THREADS="1"))
    real = subprocess.run([sys.executable, "train_pointer.py", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert (mine.returncode, mine.stdout, mine.stderr) == (real.returncode, real.stdout, real.stderr)
    assert sys.argv == argv and dict(os.environ) == env and torch.get_num_threads() == threads


def literal_assignments(path):
    """{name: value} of every top-level lower-case `name = <literal>` in a file under the repo root: a
    script's config block or a config file."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id.islower()
            and isinstance(n.value, (ast.Constant, ast.UnaryOp, ast.Tuple))}


SCRIPT_OF = dict(lanelm="train_lanelm.py", foveated="train_foveated.py", pointer="train_pointer.py",
                 ocr="train_ocr.py", seg="train_seg_gumbel.py")


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_a_config_file_holds_only_what_differs_from_the_defaults(config):
    """config/<recipe>_<dataset>.py: every key is a script key, and none restates the script's default."""
    defaults = literal_assignments(SCRIPT_OF[config.split("_")[0]])
    cfg = literal_assignments(os.path.join("config", config))
    assert cfg and set(cfg) <= set(defaults), set(cfg) - set(defaults)
    assert {k: v for k, v in cfg.items() if defaults[k] == v} == {}
