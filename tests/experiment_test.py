"""`experiment`: what one run's phases share, built once."""
from jaxprune import checkpoint, config_checks, experiment, masks


def test_rows_of_one_model_share_one_compiled_forward(tmp_path):
    # The dense row and every masked row (unstructured / n:m methods) time the same program:
    # its latency forward is compiled once, not once per row.
    exp = experiment.setup(config_checks.load_config("quickstart:smoke"), str(tmp_path),
                           progress=False)
    m = exp.model
    before = experiment._logits._cache_size()
    try:
        rows = [experiment.measure_row(exp, name, model=m, params=m.params,
                                       batch_stats=m.batch_stats,
                                       masks=masks.ones_like(m.params), train_seconds=0.0)
                for name in ("a", "b", "c")]
    finally:
        exp.writer.close()
        checkpoint.unlock_workdir(exp.workdir)
    assert experiment._logits._cache_size() - before <= 1
    # The rows themselves (timings aside: they are the machine's, not the code's).
    assert all(r["sparsity"] == 0.0 and (r["params"], r["macs"]) == (rows[0]["params"],
                                                                     rows[0]["macs"]) for r in rows)
