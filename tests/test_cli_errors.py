"""Errors raised in Ray workers reach the user as one message and exit status 2 (issue 18);
which Ray a command uses, and that it never trips over another one on the machine."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import yaml

from epiray import cli, runtime
from epiray.errors import (
    ConfigError,
    EpirayError,
    StoreError,
    error_from_traceback,
    unwrap,
)

MSG = "config c.yaml: chroms ['chr9'] not in assembly mmSyn1; expected one of ['chr1', 'chr2']."


@pytest.fixture(autouse=True)
def _error_log(tmp_path, monkeypatch):
    """The error log under the test's folder, never ~/.cache; Ray left as a test found it."""
    monkeypatch.setenv("EPIRAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(runtime, "_initialised", False)  # main never stops the session's Ray


def task_error(cause: BaseException, name: str = "task", traceback_str: str | None = None):
    """A ``RayTaskError`` as ``ray.get`` raises it: of the cause's class too."""
    from ray.exceptions import RayTaskError

    tb = traceback_str or f'Traceback (most recent call last):\n  File "x.py", line 1\n{cause!r}'
    err = RayTaskError(name, tb, cause, proctitle="ray::" + name, pid=1, ip="127.0.0.1")
    return err.as_instanceof_cause()


# ------------------------------------------------------------------------------------ unwrap
def test_unwrap_task_error_gives_the_original():
    cause = ConfigError(MSG)
    err = task_error(cause)
    assert isinstance(err, ConfigError) and MSG != str(err)  # its text: the remote traceback
    assert unwrap(err) is cause and str(unwrap(err)) == MSG


def test_unwrap_nested_wrappers():
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.tune import TuneError

    cause = StoreError("part p.parquet: cannot be read")
    # a task calling a task calling the failing one
    assert unwrap(task_error(task_error(task_error(cause), "mid"), "outer")) is cause
    # Ray Train: the failing rank after a collateral error of another
    wg = WorkerGroupError("snippets", {0: RuntimeError("collective aborted"), 1: cause})
    assert unwrap(wg) is cause
    assert unwrap(ControllerError(UserExceptionWithTraceback(cause, "tb"))) is cause
    # a Tune trial running Ray Train, re-raised by Tune
    try:
        try:
            raise task_error(wg, "trial")
        except Exception as e:
            raise TuneError("trial failed") from e
    except TuneError as e:
        assert unwrap(e) is cause


def test_unwrap_other_errors_gives_the_innermost():
    from ray.train import WorkerGroupError

    boom = ValueError("boom")
    assert unwrap(boom) is boom
    assert unwrap(task_error(boom)) is boom
    assert unwrap(WorkerGroupError("snippets", {0: boom})) is boom
    top = EpirayError("top")
    try:
        raise top from KeyError("k")
    except EpirayError as e:
        assert unwrap(e) is top
    # an error raised while handling an EpirayError is not that EpirayError
    try:
        try:
            raise ConfigError("handled")
        except ConfigError:
            raise ValueError("new") from None
    except ValueError as e:
        assert unwrap(e) is e


def test_unwrap_ray_data_udf_error_from_its_text():
    from ray.exceptions import UserCodeException

    remote = (
        "Traceback (most recent call last):\n"
        '  File "epiray/ingest.py", line 9, in task\n'
        "    raise InputDataError(...)\n"
        "epiray.errors.InputDataError: manifest m.tsv: 2 problem(s)\n"
        "  - row 3: no file\n"
        "  - row 4: no file\n"
        "\nThe above exception was the direct cause of the following exception:\n\n"
        "ray::MapBatches(task)() (pid=1, ip=127.0.0.1)\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    err = unwrap(task_error(UserCodeException("UDF failed"), "MapBatches(task)", remote))
    assert type(err).__name__ == "InputDataError" and isinstance(err, EpirayError)
    assert str(err) == "manifest m.tsv: 2 problem(s)\n  - row 3: no file\n  - row 4: no file"


def test_error_from_traceback():
    tb = 'Traceback (most recent call last):\n  File "x"\nepiray.errors.StoreError: a\nb\n'
    assert isinstance(error_from_traceback(tb), StoreError)
    assert str(error_from_traceback(tb)) == "a\nb"
    assert error_from_traceback("Traceback ...\nValueError: x") is None
    during = (
        tb + "\nDuring handling of the above exception, another exception occurred:\n\nKeyError"
    )
    assert error_from_traceback(during) is None
    assert error_from_traceback(during, final=False) is None  # not raised from it


# ------------------------------------------------------------------------------------ the CLI
def test_report_error_one_message_status_2_traceback_in_log(tmp_path, capsys):
    try:
        raise task_error(ConfigError(MSG))
    except ConfigError as e:
        assert cli.report_error(e, "train", argv=["train"]) == 2
    lines = capsys.readouterr().err.splitlines()
    log = tmp_path / "cache" / "last-error.log"
    assert lines == [
        f"epiray train: error: {MSG}",
        f"epiray train: traceback in {log} (or run with --debug)",
    ]
    text = log.read_text()
    assert text.startswith(time.strftime("%Y-%m-%d")) and "  epiray train\n" in text
    assert "Traceback" in text and "RayTaskError(ConfigError)" in text and "\x1b[" not in text


def test_report_error_unexpected_is_status_1(capsys):
    from ray.train import WorkerGroupError

    wg = WorkerGroupError("snippets", {0: ZeroDivisionError("division by zero\nmore")})
    assert cli.report_error(wg, "train") == 1
    err = capsys.readouterr().err
    assert err.startswith("epiray train: unexpected error: ZeroDivisionError: division by zero\n")
    assert "Traceback" not in err and "last-error.log" in err


def test_debug_flag_and_env_print_the_traceback(tmp_path, capsys, monkeypatch):
    for argv in (["--debug", "info", str(tmp_path)], ["info", str(tmp_path), "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)")
        assert err.splitlines()[-1].startswith("epiray info: error: store")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(["info", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture
def boom_command(monkeypatch):
    """An ``epiray boom`` command that runs a Ray task raising ``error``."""
    box = {}

    def run(args):
        import ray

        @ray.remote
        def fail():
            raise box["error"]

        ray.get(fail.remote())

    monkeypatch.setitem(cli.COMMANDS, "boom", ("fail in a Ray task", lambda p: None, run))
    return box


@pytest.mark.ray
def test_error_in_a_ray_task_is_one_message(ray_local, boom_command, capsys):
    boom_command["error"] = ConfigError(MSG)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"epiray boom: error: {MSG}"
    assert len(err.splitlines()) == 2 and "Traceback" not in err and "ray::" not in err
    assert cli.main(["--debug", "boom"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RayTaskError(ConfigError)" in err
    assert err.splitlines()[-1] == f"epiray boom: error: {MSG}"
    boom_command["error"] = KeyError("k")
    assert cli.main(["boom"]) == 1
    assert capsys.readouterr().err.startswith("epiray boom: unexpected error: KeyError: 'k'\n")


@pytest.mark.ray
def test_error_in_a_ray_data_udf_is_one_message(ray_local):
    import ray

    def udf(batch):
        raise StoreError("store s: part p: cannot be read")

    with pytest.raises(Exception) as info:
        ray.data.range(2, override_num_blocks=1).map_batches(udf).take_all()
    err = unwrap(info.value)
    assert isinstance(err, StoreError) and str(err) == "store s: part p: cannot be read"


@pytest.mark.ray
def test_train_error_in_a_worker_is_one_message(tmp_path, tiny_store, capsys):
    """A store part damaged after planning: only the Train workers read it."""
    t0 = time.perf_counter()
    _, store = tiny_store
    bad = tmp_path / "store"
    shutil.copytree(store.root, bad)
    parts = sorted(bad.glob("tracks/assembly=mmSyn1/chrom=chr1/experiment=mm.*/part.parquet"))
    for p in parts:
        p.write_bytes(p.read_bytes()[:100])
    cfg = {
        "store": str(bad),
        "out": str(tmp_path / "runs"),
        "assembly": "mmSyn1",
        "chroms": ["chr1"],
        "model": {"name": "avocado", "params": {"n_nodes": 8, "n_layers": 1}},
        "folds": {"scheme": "experiment", "k": 3, "fold": 0},
        "train": {"epochs": 1, "batch_size": 1024, "patience": None},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "tracking": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "t"},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "--config", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith("epiray train: error: part ") and "cannot be read" in errors[0]
    assert "chrom=chr1" in errors[0] and "experiment=mm." in errors[0]
    assert "Traceback" not in err and "WorkerGroupError" not in err
    assert "WorkerGroupError" in (tmp_path / "cache" / "last-error.log").read_text()
    print(f"failed Train run reported in {time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------------------------ Ray
@pytest.fixture
def fake_ray(monkeypatch):
    """``ray.init`` and friends replaced: records the calls, starts nothing."""
    import ray

    calls = []

    class Ctx:
        gcs_address = "10.0.0.7:6379"

    class Info:
        dashboard_url = "127.0.0.1:8265"

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or Info())
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(runtime, "_other_instances", lambda address: 2)
    monkeypatch.setattr(runtime, "_exported", None)
    monkeypatch.setattr(runtime, "_watcher_off", False)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", runtime.PREEMPTION_WATCHER)}
    for k in saved:
        os.environ.pop(k, None)
    yield calls
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_ensure_ray_starts_a_local_runtime_and_pins_it(fake_ray, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "_ray_start_address", lambda: None)
    with caplog.at_level(logging.INFO, logger="epiray.runtime"):
        line = runtime.ensure_ray(3)
    (kw,) = fake_ray
    assert kw["num_cpus"] == 3 and kw["address"] == "local"  # never another instance
    assert kw["runtime_env"] == {"worker_process_setup_hook": "epiray.runtime.ray_worker_setup"}
    assert os.environ["RAY_ADDRESS"] == "10.0.0.7:6379"
    assert os.environ[runtime.PREEMPTION_WATCHER] == "0"
    assert line.startswith("Ray: started a local runtime at 10.0.0.7:6379 with 3 logical CPUs")
    assert "2 other Ray instance(s) on this machine left alone" in line
    assert caplog.messages == [line]
    # RAY_ADDRESS exported for a runtime since shut down is not a cluster to connect to
    runtime.ensure_ray(3)
    assert fake_ray[1]["address"] == "local" and fake_ray[1]["num_cpus"] == 3


def test_ensure_ray_connects_to_ray_address(fake_ray, caplog):
    os.environ["RAY_ADDRESS"] = "http://head:8265"  # fake_ray restores it
    with caplog.at_level(logging.INFO, logger="epiray.runtime"):
        line = runtime.ensure_ray(3)
    (kw,) = fake_ray
    assert kw["address"] == "http://head:8265" and "runtime_env" not in kw
    assert line == "Ray: the cluster at RAY_ADDRESS=http://head:8265 (8 CPUs)"
    assert os.environ["RAY_ADDRESS"] == "http://head:8265"
    assert caplog.messages == [line]


def test_ensure_ray_leaves_the_preemption_watcher_to_clusters(fake_ray, monkeypatch):
    monkeypatch.setattr(runtime, "_ray_start_address", lambda: None)
    runtime.ensure_ray()
    assert os.environ[runtime.PREEMPTION_WATCHER] == "0"
    os.environ["RAY_ADDRESS"] = "10.0.0.9:6379"  # after a shutdown, to a cluster
    runtime.ensure_ray()
    assert fake_ray[1]["address"] == "10.0.0.9:6379"
    assert runtime.PREEMPTION_WATCHER not in os.environ


def test_ensure_ray_unreachable_cluster_is_an_epiray_error(fake_ray, monkeypatch):
    import ray

    def refuse(**kw):
        raise ConnectionError("GCS at 10.0.0.9:6379 not reachable")

    monkeypatch.setattr(ray, "init", refuse)
    os.environ["RAY_ADDRESS"] = "10.0.0.9:6379"
    with pytest.raises(EpirayError, match=r"cannot connect to the cluster at RAY_ADDRESS=10"):
        runtime.ensure_ray()
    assert not runtime.ray_initialised_here()


def test_ensure_ray_joins_a_ray_start_cluster(fake_ray, monkeypatch):
    monkeypatch.setattr(runtime, "_ray_start_address", lambda: "10.0.0.7:6379")
    line = runtime.ensure_ray(3)
    (kw,) = fake_ray
    assert kw["address"] == "10.0.0.7:6379" and "num_cpus" not in kw
    assert "runtime_env" in kw and os.environ["RAY_ADDRESS"] == "10.0.0.7:6379"
    assert line.startswith("Ray: the local cluster started by `ray start` at 10.0.0.7:6379")
    assert "num_cpus 3 does not apply to it" in line


@pytest.mark.ray
def test_worker_setup_pins_the_workers_cluster(ray_local):
    import ray

    @ray.remote
    def setup_and_read():
        runtime.ray_worker_setup()
        return os.environ["RAY_ADDRESS"]

    assert ray.get(setup_and_read.remote()) == ray.get_runtime_context().gcs_address


def record(name: str, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, logging.WARNING, "f.py", 1, msg, (), exc_info)


def test_ray_log_filters():
    from ray.train import WorkerGroupError

    token = runtime._DropTokenNotice()
    assert not token.filter(record("r", runtime._TOKEN_NOTICE + ". Set RAY_AUTH_MODE=..."))
    assert token.filter(record("r", "Token authentication is disabled for this Ray cluster."))

    short = runtime._ShortTrainErrors()
    tb = 'Traceback (most recent call last):\n  File "t.py"\nepiray.errors.StoreError: part p\n'
    r = record("w", "Error in training function:\n" + tb)
    assert short.filter(r) and r.getMessage() == "training failed: StoreError: part p"
    r = record("w", "Error in training function:\nTraceback ...\nValueError: bug\n")
    assert short.filter(r) and "ValueError: bug" in r.getMessage() and "Traceback" in r.msg
    wg = WorkerGroupError("snippets", {0: ConfigError(MSG)})
    r = record("c", "[FailurePolicy] RAISE\n  Source: worker group\nError: " + str(wg), wg)
    assert short.filter(r) and r.exc_info is None
    assert (
        r.getMessage()
        == f"[FailurePolicy] RAISE\n  Source: worker group\nError: ConfigError: {MSG}"
    )
    r = record("c", "[FailurePolicy] RAISE\nError: x", WorkerGroupError("s", {0: ValueError()}))
    assert short.filter(r) and r.exc_info is not None
    r = record("a", "Failed to send resource request for train-1.", TimeoutError())
    assert short.filter(r) and r.exc_info is None
