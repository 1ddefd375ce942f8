"""The aploss pipeline, in layers along the data's way; a module imports only from its own layer
or those below it (tests/test_layout.py):

    orchestration   CLI, the pipeline of stages, Tune sweeps, MLflow, reports
    training        one loop and its hooks, in this process or on Ray Train workers
    evaluation      COCO/VOC metrics, the evaluate and robustness stages
    data            sources -> Parquet shards -> batches; which prepared data a run uses
    (this package)  config, errors, atomic io, checkpoints, the model a config describes
"""
