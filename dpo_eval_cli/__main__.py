"""`python -m dpo_eval_cli`: the dpo-eval command."""

if __name__ == "__main__":  # scoring's forkserver children re-import the main module: run nothing then
    from dpo_eval_cli.app import main

    main()
