"""The trained detector applied: on images (`detection`), on a user's files, folders, globs or a
bucket to COCO detections (`inputs`, `predict`; on Ray Data: `batch_predict`), drawn on them
(`drawing`) and as a TorchScript program (`export`). Metrics are `pipeline.evaluation`'s."""
