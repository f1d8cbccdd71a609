"""A classical yardstick for the sentiment models: TF-IDF features and logistic regression."""

from __future__ import annotations

from collections.abc import Sequence


def tfidf_predictions(train_texts: Sequence[str], train_labels: Sequence[str], test_texts: Sequence[str]) -> list[str]:
    """Fit word 1-2 gram TF-IDF (sublinear tf) + logistic regression on the train split; predict the test split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=1000))
    model.fit(list(train_texts), list(train_labels))
    return [str(label) for label in model.predict(list(test_texts))]
