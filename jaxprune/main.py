"""Command line entry: `python -m jaxprune.main --config=configs/cifar10.py --workdir=runs/cifar10`.

Config values are overridden with `--config.train.epochs=5`; an unknown key or a value of the
wrong type stops with an error before anything runs. Running the same command on the same
workdir again resumes: finished phases are skipped, an interrupted one continues.

Bad input (config, data, workdir, checkpoints, a diverging recipe, a full disk) ends with one
line, `jaxprune: error: <problem and fix>`, and exit status 2; Ctrl-C ends with a line saying how
to resume and status 130. Anything else is a bug and keeps its traceback. Every log record,
the libraries' tracebacks included, goes to `<workdir>/jaxprune.log`; the terminal shows only
jaxprune's own lines. `--continue_older` continues a workdir whose checkpoints were made by
another version of jaxprune that did not record every setting this one has.
"""
import difflib
import errno
import gc
import logging as logging_std
import os
import re
import signal
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (e.g. configs/cifar10.py or configs/cifar10.py:smoke).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_QUIET = flags.DEFINE_bool("quiet", False, "Print nothing but errors: no log lines, no bars, no "
                           "table (results.md, results.json and metrics.jsonl are still written).")
_PROGRESS = flags.DEFINE_bool("progress", None, "Progress bars on (--progress) or off "
                              "(--noprogress); default: only when stderr is a terminal, so a "
                              "redirected log gets plain lines.")
_CONTINUE_OLDER = flags.DEFINE_bool(
    "continue_older", False, "Continue a workdir whose checkpoints were made by another version "
    "of jaxprune that did not record every setting this one has: those settings are taken at "
    "this config's values (noted in run_info.json).")
flags.mark_flags_as_required(["config", "workdir"])

USAGE_STATUS, INTERRUPTED_STATUS = 2, 130
INTERRUPTED = ("jaxprune: interrupted; rerun the same command to resume (finished phases and "
               "the last checkpoint of the current one are kept).")
_SIGINT = threading.Event()  # set by the first SIGINT (see _on_sigint)
_STOPPING = threading.Event()  # set once main has the interruption in hand


def _on_sigint(signum, frame):
    """Records the Ctrl-C, then raises KeyboardInterrupt as Python's own handler does.

    A KeyboardInterrupt does not always reach `main`: raised inside a Python function that C++
    code called (JAX hashing a static argument), it comes back wrapped in another exception
    (jax-ml/jax#9082), which the record identifies; raised where Python ignores exceptions (a
    garbage-collector callback such as JAX's, a `__del__`: jax-ml/jax#18246) it would be lost
    after Python printed an "Exception ignored" traceback, so there it is not raised, and a
    thread sends the signal again every half second until main has stopped."""
    del signum
    if not _SIGINT.is_set():
        _SIGINT.set()
        threading.Thread(target=_redeliver, daemon=True).start()
    if not _where_exceptions_are_ignored(frame):
        raise KeyboardInterrupt


def _where_exceptions_are_ignored(frame) -> bool:
    """Whether `frame` runs inside a garbage-collector callback or a `__del__`."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _redeliver() -> None:
    while not _STOPPING.wait(0.5):
        os.kill(os.getpid(), signal.SIGINT)


def _interrupted() -> None:
    _STOPPING.set()
    print("\n" + INTERRUPTED, file=sys.stderr, flush=True)
    _exit(INTERRUPTED_STATUS)


def _exit(status: int) -> None:
    """Exits at once, without interpreter finalisation: with JAX's and orbax's threads still
    alive, finalisation can crash (a segfault instead of our status). Files are written
    atomically, an unfinished save is ignored at the next start, and the kernel frees the
    workdir lock."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail(message: str, *, now: bool = False) -> None:
    """Prints `jaxprune: error: <message>` as one line and exits with status 2 (`now`: without
    interpreter finalisation, see `_exit`)."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    items = [l[2:] for l in lines[1:] if l.startswith("- ")]
    if items and len(items) == len(lines) - 1:  # "Invalid config:\n  - a\n  - b" → "…: a; b"
        text = f"{lines[0]} {'; '.join(items)}"
    else:
        text = " ".join(lines)
    print(f"jaxprune: error: {text}", file=sys.stderr, flush=True)
    if now:
        _exit(USAGE_STATUS)
    sys.exit(USAGE_STATUS)


def _flag_value(argv, name: str):
    """The value of `--name=V` / `--name V` in argv (the last one), or None."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _unknown_override(argv) -> str:
    """Names the `--config.<key>=` override that the config does not have, with the nearest key."""
    from jaxprune import config_checks  # known_keys imports the keys' modules (no TensorFlow)

    known = sorted(config_checks.known_keys())
    for arg in argv[1:]:
        match = re.match(r"--config\.([\w.]+)", arg)
        if match and match.group(1) not in known:
            key = match.group(1)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            return (f"--config.{key}: the config has no key {key}"
                    + (f"; did you mean --config.{close[0]}?" if close else
                       "; see the config file for its keys."))
    return ""


def parse_flags(argv):
    """absl flag parsing with every failure (a missing or broken config file, an unknown or
    mistyped --config. key, a missing flag) reported as one `jaxprune: error:` line."""
    path = _flag_value(argv, "config")
    if path is not None:
        file, _, variant = path.partition(":")
        if not file:
            fail("--config is empty; give a config file, e.g. --config=configs/quickstart.py.")
        if not os.path.isfile(file):
            fail(f"--config={path}: there is no file {file}; configs live in the repository's "
                 "configs/ (e.g. --config=configs/quickstart.py).")
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # config_flags' warnings: their cause is said below
    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        message = str(e)
        if path is not None and "other than None" in message:
            fail(f"--config={path}: get_config() returned None; it must return a ConfigDict "
                 "(a missing `return config`?).")
        if "Error whilst parsing config file" in message:
            lines = [l.strip() for l in message.splitlines() if l.strip()]
            fail(f"--config={path}: the config file fails to load: {lines[-1]}. Fix that file "
                 "or the variant after ':'.")
        fail(message.splitlines()[0] + ".")
    except flags.Error as e:
        fail(str(e).splitlines()[0] + " (see --helpshort).")
    except Exception as e:  # noqa: BLE001 - an override of a key the config lacks (config_flags
        # raises KeyError for a section, AttributeError for a field), or a config file that
        # raises while it is loaded
        fail(_unknown_override(argv) or f"--config={path}: the config file fails to load: "
             f"{type(e).__name__}: {str(e).strip(chr(39))}.")
    finally:
        logging.set_verbosity(verbosity)


LOG_FILE = "jaxprune.log"  # in the workdir: every log record, tracebacks included
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class _LogFile(logging_std.FileHandler):
    """`workdir/jaxprune.log`, opened at the first record (after the workdir exists); a failing
    write (a full disk) is dropped instead of printing its own traceback."""

    def handleError(self, record):
        del record


class _TerminalFilter(logging_std.Filter):
    """What the terminal shows of the log: jaxprune's own records, without tracebacks. The
    libraries' records (orbax's background-thread tracebacks on a full disk run to hundreds of
    lines) and `errors.details` go to the log file only; the error itself is one line."""

    def filter(self, record):
        if record.name.startswith("jaxprune.details") or \
                not os.path.abspath(record.pathname).startswith(_PACKAGE + os.sep):
            return False
        record.exc_info, record.exc_text = None, None  # the log file (first) has it whole
        return True


def _route_logs(workdir) -> None:
    """Every record to `workdir/jaxprune.log`; only jaxprune's own, one line each, to stderr."""
    root = logging_std.getLogger()
    for handler in root.handlers:
        handler.addFilter(_TerminalFilter())
    if workdir and str(workdir).strip():
        handler = _LogFile(os.path.join(os.fspath(workdir), LOG_FILE), delay=True)
        handler.setLevel(logging_std.INFO)
        handler.setFormatter(logging_std.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
        root.handlers.insert(0, handler)  # before the terminal's filter trims a record
    from jaxprune import errors  # light: no JAX
    errors.details.setLevel(logging_std.INFO)
    main_hook = sys.excepthook

    def excepthook(kind, value, tb):
        """Native threads of TensorStore print Python errors through `sys.excepthook` (after a
        failed save: 'Event loop is closed', many times): to the log file. The main thread's
        (a bug's traceback) stays on the terminal."""
        if threading.current_thread() is threading.main_thread():
            main_hook(kind, value, tb)
        else:
            errors.details.info("Error in a library thread:", exc_info=(kind, value, tb))

    sys.excepthook = excepthook


def _disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])}; every setting is a --config.<key>= "
             "or --workdir= flag.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _route_logs(_WORKDIR.value)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored (nohup &)
        signal.signal(signal.SIGINT, _on_sigint)
    workdir = _WORKDIR.value
    try:
        from jaxprune import pipeline  # after flag parsing, so --help is fast

        try:
            config = _CONFIG.value
        except Exception as e:  # noqa: BLE001 - config_flags defers some load failures to here
            fail(f"--config: the config file fails to load: {e}.")
        if config is None:
            fail("--config gave no config: its get_config() returned None; it must return a "
                 "ConfigDict.")
        pipeline.run(config, workdir, progress=not _QUIET.value, bars=_PROGRESS.value,
                     continue_older=_CONTINUE_OLDER.value)
        _STOPPING.set()  # finished: a Ctrl-C that came too late to stop it is not re-sent
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:  # noqa: BLE001 - sorted into bad input and bugs here
        if _SIGINT.is_set():  # the Ctrl-C, wrapped in another exception on its way up
            _interrupted()
        pipeline = sys.modules.get("jaxprune.pipeline")
        if pipeline is not None and isinstance(e, pipeline.USER_ERRORS):
            fail(e, now=True)  # bad input: one clear message, no traceback
        if _disk_full(e):
            fail(f"the disk holding --workdir {workdir} is full ({type(e).__name__}). Free some "
                 "space and rerun the same command to resume; nothing saved was lost.", now=True)
        raise  # a bug: keep the traceback

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
