"""data.service: batches made by real tf.data service feeders (dispatcher + worker, on
127.0.0.1, in this process) equal the local pipeline's, batch for batch and in order; a
feeder sending batches out of order is caught; bad settings exit 2. The end-to-end run
(a feeder process killed mid-run, the run resumed bit for bit) is in test_resume.py."""
import gc

import numpy as np
import pytest

from conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def feeders():
    from tfpretrain.data import service

    servers = [service.serve(0, "127.0.0.1") for _ in range(2)]
    targets = service.addresses([f"127.0.0.1:{d.target.rpartition(':')[2]}"
                                 for d, _ in servers])
    yield targets
    # the tests' datasets still hold jobs on the feeders until collected, and a worker's
    # stop() waits for them: 10-30 s when the module ends its test process (pytest -n)
    gc.collect()
    for dispatcher, worker in servers:
        worker.stop()
        dispatcher.stop()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "train.rows"
    np.random.default_rng(0).integers(5, 300, (500, 33)).astype(np.int32).tofile(path)
    return np.memmap(path, np.int32, "r", shape=(500, 33))


def batches(ds):
    return [tuple(np.asarray(t) for t in b) for b in ds.as_numpy_iterator()]


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)    # NaN weights (poison) compare equal


def test_two_feeders_make_the_local_batches_in_order(feeders, rows):
    """From step 7, 11 steps (odd: the first feeder makes one more), a poisoned step."""
    from tfpretrain.data.pipeline import train_dataset

    kwargs = dict(batch_size=16, seed=3, start_step=7, num_steps=11, poison=[9])
    local = batches(train_dataset(rows, **kwargs))
    assert_same_batches(batches(train_dataset(rows, **kwargs, service=feeders)), local)
    assert np.isnan(local[2][2]).all() and not np.isnan(local[1][2]).any()
    part = batches(train_dataset(rows, **kwargs, part=(4, 12), service=feeders[:1]))
    assert_same_batches(part, [tuple(t[4:12] for t in b) for b in local])


def test_masked_lm_batches_travel_too(tmp_path, feeders, rows):
    """The masked-LM batcher (masks drawn from (seed, step)) runs on the feeders."""
    from tfpretrain.data.masking import Masker
    from tfpretrain.data.pipeline import train_dataset

    cfg = tiny_config(tmp_path, model={"arch": "bert", "objective": "mlm"})
    masker = Masker(cfg.mlm, 300, 33)
    kwargs = dict(batch_size=8, seed=5, num_steps=5, to_batch=masker)
    local = list(train_dataset(rows, **kwargs).as_numpy_iterator())
    served = list(train_dataset(rows, **kwargs, service=feeders).as_numpy_iterator())
    assert len(served) == len(local) == 5
    for (fa, ya, wa), (fb, yb, wb) in zip(local, served):
        assert fa.keys() == fb.keys()
        for key in fa:
            np.testing.assert_array_equal(fa[key], fb[key])
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(wa, wb)


def test_a_batch_out_of_order_stops_with_a_message(feeders):
    """A feeder whose share skips a position (as batches from several workers behind one
    dispatcher can arrive): one UserError naming the fix, not a training run on reordered
    data."""
    import tensorflow as tf

    from tfpretrain.data import service
    from tfpretrain.errors import UserError

    def part(first, every):   # the second feeder starts one position late
        start = first + (every if first % 2 else 0)
        return tf.data.Dataset.range(start, 40, every).map(lambda s: (s, (s,)))

    ds = service.round_robin(part, feeders, 0, 40)
    with pytest.raises(UserError, match="out of order.*exactly one worker"):
        with service.feeder_errors(feeders):
            list(ds)


def test_the_feeders_need_the_token_cache(tmp_path, feeders, rows):
    """Rows not in a file: refused up front; a rows file the feeder cannot read: one
    message naming the shared-path requirement."""
    from tfpretrain.data import service
    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.errors import UserError

    with pytest.raises(UserError, match="data.cache: true"):
        service.file_reader(np.asarray(rows))
    path = tmp_path / "gone.rows"
    np.asarray(rows).tofile(path)
    gone = np.memmap(path, np.int32, "r", shape=rows.shape)
    ds = train_dataset(gone, 16, 3, num_steps=3, service=feeders)
    path.unlink()
    with pytest.raises(UserError, match="could not read the token cache.*same path"):
        with service.feeder_errors(feeders):
            list(ds)


@pytest.mark.parametrize("setting, problem", [
    ("data.service=nowhere", "`data.service` must be `host:port`"),
    ("data.cache=false", "`data.service` needs `data.cache: true`"),
    (None, "cannot reach the feeder grpc://127.0.0.1:9"),
])
def test_bad_feeder_settings_exit_2(tmp_path, setting, problem):
    extra = ["--set", setting] if setting else []
    r = run_cli("tfpretrain.fit", "--run-dir", str(tmp_path / "run"), "--set",
                "data.embedded_documents=300", "--set", "data.service=127.0.0.1:9", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert problem in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
