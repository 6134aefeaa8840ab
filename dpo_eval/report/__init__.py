"""One self-contained page: template, views, plots, examples, and the sections of each stage.
May import: every stage below it (data to training); never studies or the orchestration.
"""
