from retrieval_ablations import OracleMirror, lr_at, evaluate_mirror  # noqa
