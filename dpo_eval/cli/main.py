"""The dpo-eval app: every command registered here, and `main`, which turns user errors into one line.

It is the one place that sees both sides: the Prefect-free commands of dpo_eval.cli (core_commands, judge,
forgetting, reward) and the commands that start flows (dpo_eval.cli.flow_commands). The rest of dpo_eval never
imports dpo_eval.flows or dpo_eval.tasks (tests/test_layout.py).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from dpo_eval.cli import core_commands, export, flow_commands, forgetting, judge, reward
from dpo_eval.cli.quiet import quiet
from dpo_eval.errors import DpoEvalError

app = typer.Typer(
    name="dpo-eval",
    help="Did the DPO alignment take? Compare a tuned checkpoint with its base, feature by feature.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error "
                                     "(anywhere on the command line)."),
          verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings, log lines and "
                                       "loading bars (anywhere on the command line).")) -> None:
    """Did the DPO alignment take? Compare a tuned checkpoint with its base, feature by feature."""


app.command()(flow_commands.evaluate)
app.command()(core_commands.pairs)
app.command()(core_commands.generate)
app.command()(core_commands.analyze)
app.command()(core_commands.diagnose)
app.command()(flow_commands.train)
app.command("train-reward")(reward.train_reward)
app.command()(core_commands.trend)
app.command()(core_commands.compare)
app.command()(flow_commands.serve)
app.command()(flow_commands.worker)
app.command()(flow_commands.demo)
app.command()(judge.judge)
app.command()(forgetting.forgetting)
app.command()(export.export)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of `dpo-eval` and `python -m dpo_eval`: a user error is one line on stderr, exit 2;
    `--debug` re-raises it with the original traceback; third-party notices are filtered unless `--verbose`."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    if "--verbose" in args:
        args.remove("--verbose")
    else:
        quiet()
    try:
        app(args=args, prog_name="dpo-eval")  # click handles usage errors and --help itself
    except DpoEvalError as exc:
        if debug:
            raise
        print(f"dpo-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
