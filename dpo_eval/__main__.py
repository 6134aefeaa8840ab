"""`python -m dpo_eval`: the dpo-eval command.

A program entry point, not library code: the app (flows/cli.py) is imported only when this module runs as
the program, so importing dpo_eval.__main__ imports nothing and the core stays free of flows/.
"""

if __name__ == "__main__":  # also keeps scoring's forkserver children from re-running the command
    from flows.cli import main

    main()
