"""The search loop: budget respected, log complete, resumed == uninterrupted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune.search import controllers, loop, space as space_lib

G = 4
SIZES = jnp.asarray([8.0, 16.0, 16.0, 32.0])
TARGET = jnp.asarray([0.9, 0.3, 0.6, 0.4])


def macs_fn(keep):  # a bilinear chain cost, like consecutive convs
    ext = jnp.concatenate([jnp.ones((1,)), keep])
    return jnp.sum(ext[:-1] * ext[1:] * SIZES * 10.0)


def params_fn(keep):
    return jnp.sum(keep * SIZES)


def evaluate_fn(keep):
    return 1.0 - jnp.mean((keep - TARGET[None, :]) ** 2, axis=-1)


class Interrupt(Exception):
    pass


def _run(tmp_path, name, method, rounds=4, k=6, fail_at=None):
    calls = {"n": 0}

    def evaluate(keep):
        if fail_at is not None and calls["n"] == fail_at:
            raise Interrupt()
        calls["n"] += 1
        return evaluate_fn(keep)

    space = space_lib.SearchSpace.create(G, lower=0.1, upper=1.0)
    ckpt = checkpoint.Checkpointer(str(tmp_path / name), fingerprint={"method": method})
    budget = 0.5 * float(macs_fn(jnp.ones((G,))))
    return loop.run(controllers.get_controller(method), space, key=jax.random.key(3), rounds=rounds, k=k,
                    evaluate_fn=evaluate, macs_fn=macs_fn, params_fn=params_fn, budget=budget,
                    checkpointer=ckpt, progress=False), budget


@pytest.mark.parametrize("method", ["reinforce", "gan", "evolution", "random", "uniform"])
def test_every_candidate_meets_budget_and_is_logged(tmp_path, method):
    result, budget = _run(tmp_path, "a", method)
    n = int(result.log.filled)
    assert n == 4 * 6
    assert np.all(result.log.macs[:n] <= budget + 1e-3)
    assert np.all(result.log.keep[:n] >= 0.1 - 1e-6) and np.all(result.log.keep[:n] <= 1.0 + 1e-6)
    assert result.best_accuracy == pytest.approx(float(np.max(result.log.accuracy[:n])))
    np.testing.assert_allclose(result.log.accuracy[:n], np.asarray(evaluate_fn(result.log.keep[:n])),
                               rtol=1e-6)


@pytest.mark.parametrize("method", ["reinforce", "gan", "evolution"])
def test_resumed_search_equals_uninterrupted(tmp_path, method):
    full, _ = _run(tmp_path, "full", method)
    with pytest.raises(Interrupt):
        _run(tmp_path, "cut", method, fail_at=2)  # dies in round 3, after 2 saved rounds
    resumed, _ = _run(tmp_path, "cut", method)
    np.testing.assert_array_equal(full.log.keep, resumed.log.keep)
    np.testing.assert_array_equal(full.log.accuracy, resumed.log.accuracy)
    np.testing.assert_array_equal(full.best_keep, resumed.best_keep)


def test_bad_k_and_rounds(tmp_path):
    space = space_lib.SearchSpace.create(G, lower=0.1)
    with pytest.raises(ValueError, match="candidates"):
        loop.run(controllers.get_controller("random"), space, key=jax.random.key(0), rounds=2, k=0,
                 evaluate_fn=evaluate_fn, macs_fn=macs_fn, params_fn=params_fn, budget=1e9,
                 progress=False)


def test_successive_halving_rescores_the_best_and_keeps_distinct_candidates():
    g = 2
    log = loop.SearchLog.empty(6, g)
    keeps = np.asarray([[0.2, 0.2], [0.4, 0.4], [0.4, 0.4], [0.6, 0.6], [0.8, 0.8], [1.0, 1.0]],
                       np.float32)
    log.keep[:] = keeps
    log.accuracy[:] = [0.1, 0.5, 0.5, 0.4, 0.3, 0.2]  # row 2 repeats row 1
    log = log._replace(filled=np.asarray(6, np.int32))
    seen = []

    def full(k):  # a better proxy disagrees with the cheap one: the higher keep wins
        seen.append(k.copy())
        return k[:, 0]

    best, history = loop.successive_halving(
        log, [loop.Stage("full", 3, full), loop.Stage("tune", 2, lambda k: -k[:, 0])])
    np.testing.assert_allclose(seen[0], keeps[[1, 3, 4]])  # the top 3 distinct by the cheap score
    assert history[0]["rows"] == [1, 3, 4] and history[1]["rows"] == [4, 3]
    np.testing.assert_allclose(best, [0.6, 0.6])  # the last stage decides
    with pytest.raises(ValueError, match="top=0"):
        loop.successive_halving(log, [loop.Stage("x", 0, full)])
