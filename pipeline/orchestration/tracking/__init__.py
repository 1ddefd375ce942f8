"""Every MLflow call of the project, by concern: where the server is (`connection`), the runs of a
pipeline, its stages and a sweep's trials (`pipeline_runs`), what each stage logs (`records`), the
training journal sent from a driver thread (`forwarding`) and the model registry (`registry`,
with `registered_model`, the code MLflow runs to load the registered detector). Training and
evaluation never call MLflow."""
