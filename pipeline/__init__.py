"""The stages of the aploss pipeline: data-prep, train, evaluate, tune."""
