"""Input errors are found again behind Ray's wrappers; everything else is not an input error."""

import traceback

from rayprune.config import ConfigError
from rayprune.data.pool import PoolError
from rayprune.errors import InputError, one_line, user_error_message


def raised(make):
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test wants whatever was raised
        return exc
    raise AssertionError("nothing raised")


def remote_traceback(error: Exception, wrapper: Exception) -> str:
    """The traceback text of a worker that raised ``wrapper`` from ``error``."""
    def fail():
        try:
            raise error
        except type(error) as exc:
            raise wrapper from exc

    try:
        fail()
    except type(wrapper):
        return traceback.format_exc()
    raise AssertionError("unreachable")


def test_plain_and_chained_input_errors():
    assert user_error_message(PoolError("a.parquet, row 3: label 7 is out of range")) == \
        "a.parquet, row 3: label 7 is out of range"
    assert user_error_message(ConfigError("extrapolation.k=9\nexceeds")) == "extrapolation.k=9 exceeds"

    def chained():
        try:
            raise InputError("id 5: bad")
        except InputError as exc:
            raise RuntimeError("stage failed") from exc

    assert user_error_message(raised(chained)) == "id 5: bad"

    def bug_while_handling():
        try:
            raise InputError("id 5: bad")
        except InputError:
            return {}["missing"]

    assert user_error_message(raised(bug_while_handling)) is None
    assert user_error_message(KeyError("bug")) is None
    assert user_error_message(ValueError("an algorithm's own argument check")) is None
    assert one_line("a\n  b\tc ") == "a b c"


def test_ray_task_error_with_an_input_error_cause():
    from ray.exceptions import RayTaskError

    cause = PoolError("test pool /p, id 9: image has 3 bytes")
    error = RayTaskError("Evaluator.run", "Traceback ...\nlong remote text", cause, proctitle="x", pid=1,
                         ip="127.0.0.1").as_instanceof_cause()
    assert isinstance(error, PoolError)  # the dual class; its str() is the whole remote traceback
    assert "long remote text" in str(error)
    assert user_error_message(error) == "test pool /p, id 9: image has 3 bytes"


def test_ray_data_udf_error_whose_cause_was_lost_in_pickling():
    """Ray Data raises UserCodeException from the UDF's error; pickling drops __cause__,
    so only the remote traceback text still holds the PoolError."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayTaskError

    text = remote_traceback(PoolError("pool /p, id 350: image has 191 bytes"),
                            UserCodeException("UDF failed to process a data block."))
    bare = UserCodeException("UDF failed to process a data block.")  # as it arrives: no __cause__
    error = RayTaskError("MapWorker(FilterIds).submit", text, bare, proctitle="x", pid=1, ip="127.0.0.1")
    assert "rayprune.data.pool.PoolError: pool /p, id 350" in text
    assert user_error_message(error.as_instanceof_cause()) == "pool /p, id 350: image has 191 bytes"
    assert user_error_message(error) == "pool /p, id 350: image has 191 bytes"
    text = remote_traceback(ZeroDivisionError("x"), UserCodeException("UDF failed"))
    assert user_error_message(RayTaskError("f", text, UserCodeException("UDF failed"), proctitle="x", pid=1,
                                           ip="127.0.0.1")) is None

    def bug_while_handling():
        try:
            raise PoolError("id 1: bad")
        except PoolError:
            return {}["missing"]  # a bug in a handler: not the user's input

    try:
        bug_while_handling()
    except KeyError:
        text = traceback.format_exc()
    assert "During handling" in text and "PoolError: id 1: bad" in text
    assert user_error_message(RayTaskError("f", text, KeyError("missing"), proctitle="x", pid=1,
                                           ip="127.0.0.1")) is None


class WorkerExceptionStandIn(Exception):
    """What Ray Train puts in ``WorkerGroupError.worker_failures`` for a worker's exception.

    Ray's own class (UserExceptionWithTraceback in Ray 2.60) is internal. Its shape is what
    rayprune.errors relies on: the worker's exception under ``_base_exc``, the worker's
    traceback text under ``_traceback_str``, ``str()`` giving that text and no ``args``.
    """

    def __init__(self, exc: BaseException, traceback_str: str):
        self._base_exc = exc
        self._traceback_str = traceback_str

    def __str__(self) -> str:
        return self._traceback_str


def test_ray_train_worker_group_error():
    from ray.train import WorkerGroupError

    inner = PoolError("rows at /s, id 4: image has 10 bytes")
    wrapped = WorkerExceptionStandIn(inner, traceback_str="Traceback ...\nPoolError: ...")
    error = WorkerGroupError("[Rank 0] ...", {0: wrapped, 1: wrapped})
    assert user_error_message(error) == "rows at /s, id 4: image has 10 bytes"

    def run_trainer_like():
        try:
            raise error
        except WorkerGroupError as exc:
            raise RuntimeError(f"scoring run failed: {exc}") from exc

    assert user_error_message(raised(run_trainer_like)) == "rows at /s, id 4: image has 10 bytes"
    assert user_error_message(WorkerGroupError("[Rank 0] OOM", {0: MemoryError()})) is None
