"""`rlm-server eval`: does the RLM help on the configured model? Generated long-context tasks,
run two ways through the server's own engine (the RLM, and the same input in one prompt to the
same model), scored, and written out as JSONL rows, a Markdown table and an SVG plot.

tasks.py makes the inputs from a seed, scoring.py scores answers, runner.py runs them through
the engine, report.py writes the table and the plot, cli.py is the command.
"""
