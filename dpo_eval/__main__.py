"""`python -m dpo_eval`: runs the installed `dpo-eval` command.

The core does not import the orchestration layer: the command is found through the distribution's
`console_scripts` entry point (pyproject's [project.scripts]), as the `dpo-eval` executable finds it.
"""

if __name__ == "__main__":  # also keeps scoring's forkserver children from re-running the command
    from importlib.metadata import entry_points

    found = entry_points(group="console_scripts", name="dpo-eval")
    if not found:
        raise SystemExit("dpo-eval: error: the dpo-eval command is not installed here; run `make install`")
    next(iter(found)).load()()
