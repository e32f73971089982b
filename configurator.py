"""
Config overrides, nanoGPT style, but strict. A train script defines its config as plain module-level
variables, then calls

    config = configure(globals())

which applies, in order, every positional config file (`config/x.py`, plain Python assignments) and
every `--key=value`, and returns the final {key: value} dict. Rules:
  - an unknown key (on the command line *or* inside a config file) is an error naming the closest key;
  - a value must have its default's type (an int is accepted for a float; a tuple's elements are checked
    too; None is a value only where the default is None, and a None default takes anything);
  - values are Python literals (`--flag=False` is False, `--betas=(0.9,0.95)`); a bare word is a string;
  - the counts every script shares (POSITIVE_KEYS: steps, batch size, log/eval intervals, eval sizes) must be >= 1
    where their default is (bench.py's batch_size=0 means "the preset's");
  - `--help` lists every key with its default.
"""
import ast
import difflib
import os
import sys
import traceback

CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))
# the same meaning in every train script; 0 would divide by zero (step % log_interval) or evaluate nothing
POSITIVE_KEYS = ("max_steps", "batch_size", "log_interval", "eval_interval", "n_eval", "eval_batch")


class ConfigError(ValueError):
    pass


def config_keys(globs):
    """The script's config: public module-level values of plain types defined before configure()."""
    return {k: v for k, v in globs.items()  # UPPERCASE names are constants, not config
            if not k.startswith("_") and not k.isupper() and isinstance(v, CONFIG_TYPES) and not callable(v)}


def check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")


def check_type(key, value, default, where):
    if default is None:  # a None default takes anything (e.g. an optional path or count)
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        if ok and default and len({type(d) for d in default}) == 1:  # (0.9, 0.95): every element a float
            value = [check_type(f"{key}[{i}]", v, default[0], where) for i, v in enumerate(value)]
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))  # None too: --max_steps=None is an error, not a crash later
    if not ok:
        raise ConfigError(f"config key '{key}' in {where} expects {type(default).__name__} "
                          f"(default {default!r}) but got {type(value).__name__} {value!r}")
    return value


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def apply_config_file(path, defaults, values):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    namespace = {}
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # a typo in the file itself: one line naming it, as for a bad key
        in_file = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        line = e.lineno if isinstance(e, SyntaxError) else (in_file[-1] if in_file else "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    for key in assigned_names(source):  # `x = ...` lines only: an import (`from math import pi`) is not a key
        if not key.startswith("_"):
            check_key(key, defaults, path)
            values[key] = check_type(key, namespace[key], defaults[key], path)


def assigned_names(source):
    """Module-level names a config file assigns (x = ..., x: T = ..., x += ..., a = b = ...), in order."""
    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):  # a, b = 1, 2 assigns both
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id not in names:
                    names.append(n.id)
    return names


def parse_args(defaults, argv):
    """Pure function (tests call it): defaults + argv -> final config dict, or ConfigError."""
    values = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            apply_config_file(arg, defaults, values)
            continue
        if "=" not in arg:
            raise ConfigError(f"expected --key=value, got '{arg}'")
        key, text = arg[2:].split("=", 1)
        check_key(key, defaults, "the command line")
        value = parse_value(text)
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = text  # a string key takes the text as written: --out_dir=2024 is '2024', not an int error
        values[key] = check_type(key, value, defaults[key], "the command line")
    for key in POSITIVE_KEYS:
        if isinstance(defaults.get(key), int) and defaults[key] >= 1 and values[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {values[key]}")
    return values


def help_text(defaults, script):
    lines = [f"usage: python {script} [config/file.py ...] [--key=value ...]", "", "config keys (default):"]
    width = max((len(k) for k in defaults), default=0)
    lines += [f"  --{k:<{width}} = {v!r}" for k, v in defaults.items()]
    return "\n".join(lines)


def configure(globs, argv=None):
    """Apply config files and --key=value to the calling script's globals; returns the config dict."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = config_keys(globs)
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, os.path.basename(globs.get("__file__", "train.py"))))
        sys.exit(0)
    try:
        values = parse_args(defaults, argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    changed = {k: v for k, v in values.items() if v != defaults[k]}
    if changed:
        print("overrides: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    globs.update(values)
    return values
