"""Detections and their scores: COCO and VOC metrics, the evaluate stage, robustness under
perturbations. Below training, which validates through it.
"""
