"""The ``tolcli`` command line: a thin typer layer over the library.

Each command parses options, makes library calls, and formats the result. Library errors
(:class:`tolcli.errors.TolcliError`) become one line on stderr and a documented exit code in
:func:`main`, the single place where that happens.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

from tolcli import __version__
from tolcli.cli import _help, jsondoc
from tolcli.cli._common import Output, error_json, flag_for
from tolcli.cli.bundles import convert_cmd, drop_cmd, inspect_cmd, schema_cmd, verify_cmd
from tolcli.cli.compress import compress_cmd
from tolcli.cli.deploy import bench_lookup_cmd, strip_cmd
from tolcli.cli.evaluate import eval_ppl_cmd, sweep_cmd
from tolcli.cli.generate import export_hf_cmd, generate_cmd
from tolcli.cli.info import info
from tolcli.cli.precompute import precompute_cmd
from tolcli.cli.transport import pack_cmd, unpack_cmd
from tolcli.errors import ExitCode, TolcliError
from tolcli.fsutil import sigterm_as_interrupt
from tolcli.progress import close_all as close_progress

try:  # typer >= 0.2x vendors its own click; older releases use click itself
    from typer._click import exceptions as click_exc  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

# Ctrl-C arrives as typer.Abort / click's Abort (older typer) or as Exit(130) (typer >= 0.2x).
_ABORTS: tuple[type[BaseException], ...] = tuple(
    {KeyboardInterrupt, typer.Abort, *(c for c in [getattr(click_exc, "Abort", None)] if c is not None)}
)
_EXITS: tuple[type[BaseException], ...] = tuple(
    {typer.Exit, *(c for c in [getattr(click_exc, "Exit", None)] if c is not None)}
)

_help.install()

app = typer.Typer(
    name="tolcli",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tolcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """Precompute, compress, verify and evaluate token-wise lookups (ToLs) of MemoryLLM-style models.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 quality gate failed, 4 bad input,
    5 verification failed, 6 cannot write output, 130 interrupted (docs/cli.md).
    """


COMMANDS = {
    "info": info,
    "precompute": precompute_cmd,
    "inspect": inspect_cmd,
    "verify": verify_cmd,
    "convert": convert_cmd,
    "schema": schema_cmd,
    "compress": compress_cmd,
    "pack": pack_cmd,
    "unpack": unpack_cmd,
    "eval-ppl": eval_ppl_cmd,
    "drop": drop_cmd,
    "strip": strip_cmd,
    "sweep": sweep_cmd,
    "bench-lookup": bench_lookup_cmd,
    "generate": generate_cmd,
    "export-hf": export_hf_cmd,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def _error(text: str) -> None:
    sys.stderr.write(f"tolcli: error: {text}\n")
    sys.stderr.flush()


def _debug_first(args: list[str]) -> list[str]:
    """``--debug`` is accepted anywhere before ``--`` (``tolcli precompute demo -o x --debug``): moved to the front,
    where the root command reads it."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for i, a in enumerate(args) if not (i < end and a == "--debug"))]


def _json_requested(args: list[str]) -> bool:
    """``--json`` on the command line (before ``--``): every outcome, errors included, is then one JSON document."""
    end = args.index("--") if "--" in args else len(args)
    return "--json" in args[:end]


def _command_named(args: list[str]) -> str | None:
    """The command on the command line (root options take no values, so it is the first word), if it is one."""
    word = next((a for a in args if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _fail(text: str, json_out: bool, error: dict) -> None:
    """Report a failure: one line on stderr, and under ``--json`` an error document on stdout unless the command
    already printed its own document."""
    _error(text)
    if json_out and not jsondoc.emitted():
        Output(json=True).emit_json(jsondoc.error_document(error, None))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (never raises unless --debug)."""
    args = _debug_first(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args or bool(os.environ.get("TOLCLI_DEBUG"))
    json_out = _json_requested(args)
    jsondoc.begin(_command_named(args))
    interrupted = jsondoc.error_object(ExitCode.INTERRUPTED, "interrupted")
    signals: list[int] = []
    try:
        with sigterm_as_interrupt() as signals:  # SIGTERM/SIGHUP unwind like Ctrl-C: temp files removed, locks released
            try:
                rv = app(args=args, prog_name="tolcli", standalone_mode=False)
            finally:
                close_progress()  # a bar or heartbeat still running: stopped before any error line
        if rv == ExitCode.INTERRUPTED:
            _fail("interrupted", json_out, interrupted)
        return int(rv) if isinstance(rv, int) else ExitCode.OK
    except TolcliError as e:
        if debug:
            traceback.print_exc()
        # A signal arrived and something turned its KeyboardInterrupt into this error (or caught it and went on to
        # fail): after Ctrl-C or SIGTERM the outcome is "interrupted", whatever the error on the way out.
        if signals:
            _fail("interrupted", json_out, interrupted)
            return ExitCode.INTERRUPTED
        _fail(e.one_line(flag_for), json_out, error_json(e))
        return int(e.exit_code)
    except click_exc.ClickException as e:  # bad usage: click's message, on one line like every other error
        help_error = getattr(click_exc, "NoArgsIsHelpError", None)
        if help_error is not None and isinstance(e, help_error):
            e.show()  # `tolcli` alone: the help text
            return int(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        text = " ".join(e.format_message().split()) + where
        code = e.exit_code if e.exit_code in set(ExitCode) - {ExitCode.OK} else ExitCode.USAGE
        _fail(text, json_out, jsondoc.error_object(code, text))
        return int(e.exit_code)
    except _ABORTS:
        _fail("interrupted", json_out, interrupted)
        return ExitCode.INTERRUPTED
    except _EXITS as e:
        return int(e.exit_code)  # type: ignore[attr-defined]
    except Exception as e:  # a bug: keep it to one line unless asked
        if debug:
            traceback.print_exc()
        if signals:  # an extension caught the KeyboardInterrupt and raised this instead: still an interruption
            _fail("interrupted", json_out, interrupted)
            return ExitCode.INTERRUPTED
        text = f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it)"
        _fail(text, json_out, jsondoc.error_object(ExitCode.INTERNAL, text))
        return ExitCode.INTERNAL


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
