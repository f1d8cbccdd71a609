"""The eval stages: shared-prefix decoding, metrics, prediction files, the TF-IDF baseline."""
