"""The worker process of the process executor (executors.Worker): `python -m posttrain.rewarding.worker FD`.

Receives (RewardSpec, kwargs) over the socket FD, resolves the spec's function once (its factory too), calls it and
sends back ("ok", values) or ("error", text). Not imported by the package, so `-m` runs it exactly once.
"""
from __future__ import annotations

import asyncio
import inspect
import pickle
import sys


def main(fd: int) -> None:
    from multiprocessing.connection import Connection

    from posttrain.rewarding.executors import raised
    from posttrain.rewarding.loading import resolve

    conn = Connection(fd)
    fn = None                                            # one worker serves one reward: resolved on the first call
    while True:
        try:
            spec, kwargs = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            fn = fn or resolve(spec, "reward", "worker process")
            result = fn(**kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(result)
            if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
                result = result.tolist()
            reply = pickle.dumps(("ok", result))
        except BaseException as e:  # noqa: BLE001  (reported to the trainer)
            reply = pickle.dumps(("error", raised(e)))
        conn.send_bytes(reply)


if __name__ == "__main__":
    main(int(sys.argv[1]))
