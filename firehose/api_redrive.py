"""The daemon's side of ``firehose redrive`` (firehose/redrive.py): a PutRecordBatch carrying a
redrive id is stored once. On one node the id rides among the positions of the frame its records
are in (the stream remembers the last ``REMEMBERED_IDS``); in cluster mode it is claimed
cluster-wide first (firehose/cluster_ids.py), so a rerun through any daemon stores nothing twice."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import structlog
from aiohttp import web

from firehose.api import ApiError, FirehoseApi, _response
from firehose.log import LogError, LogTooLargeError

__all__ = ["store_redriven"]

log = structlog.get_logger()


async def store_redriven(api: FirehoseApi, rt: Any, redrive: str, records: list[bytes], nbytes: int) -> web.Response:
    """A request of ``firehose redrive`` (firehose/redrive.py): stored with its id among the
    positions of the same frame, or, when the stream already holds the id, answered without
    storing anything."""
    from firehose.cluster import ClusteredStream
    from firehose.redrive import redrive_positions

    if isinstance(rt, ClusteredStream):
        await _in_cluster(api, rt, redrive, records, nbytes)
        return _answer(redrive, len(records))
    positions = redrive_positions(rt.positions, redrive, int(time.time() * 1000))
    if positions is None:
        log.info("redrive_duplicate", stream=rt.name, redrive_id=redrive, records=len(records))
    else:
        api._refuse_over_limits(rt, records, nbytes)
        try:
            await rt.put(records, nbytes=nbytes, positions=positions)
        except (LogError, OSError):
            raise ApiError("ServiceUnavailableException", "Slow down.", 503) from None
    return _answer(redrive, len(records))


def _answer(redrive: str, count: int) -> web.Response:
    ids = [hashlib.sha256(f"{redrive}:{i}".encode()).hexdigest()[:40] for i in range(count)]
    return _response({"FailedPutCount": 0, "Encrypted": False, "RequestResponses": [{"RecordId": i} for i in ids]})


async def _in_cluster(api: FirehoseApi, rt: Any, redrive: str, records: list[bytes], nbytes: int) -> None:
    """Cluster mode: the redrive id is claimed cluster-wide (firehose/cluster_ids.py), so a
    rerun through any daemon stores nothing twice."""
    if rt.redrive_ids is None:  # the cluster's facts not reachable yet
        raise ApiError("ServiceUnavailableException", "Slow down.", 503)
    api._refuse_over_limits(rt, records, nbytes)
    try:
        outcome = await rt.redrive_ids.store(
            redrive, lambda positions: rt.put(records, nbytes=nbytes, positions=positions))
    except LogTooLargeError as exc:
        raise ApiError("InvalidArgumentException", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - NATS away or the stream full: nothing stored, retried
        log.warning("redrive_store_failed", stream=rt.name, redrive_id=redrive, error=str(exc)[:300])
        raise ApiError("ServiceUnavailableException", "Slow down.", 503) from None
    if outcome == "busy":
        raise ApiError("ServiceUnavailableException", "Slow down.", 503)
    if outcome == "duplicate":
        log.info("redrive_duplicate", stream=rt.name, redrive_id=redrive, records=len(records))

