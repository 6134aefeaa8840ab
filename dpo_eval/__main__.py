"""`python -m dpo_eval`: the dpo-eval command.

The CLI lives in the dpo_eval_cli package (its flow commands import flows/, which the core never does);
it is imported only when this module runs as the program, so importing dpo_eval.__main__ imports nothing.
"""

if __name__ == "__main__":  # also keeps scoring's forkserver children from re-running the command
    from dpo_eval_cli.app import main

    main()
