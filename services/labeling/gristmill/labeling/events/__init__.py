"""Events: the ``DatasetVersionPublished`` payload labeling emits, and the ``PredictionLogged`` and
``FeedbackRecorded`` consumers."""
