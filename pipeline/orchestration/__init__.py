"""The run as a user starts it: the CLI, the pipeline of stages (run), Tune sweeps (tune), MLflow
(tracking, the only module that talks to it) and reports over its runs (report).
"""
