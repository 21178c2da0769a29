"""Documented payloads, one module per platform, and the batching they share.

Each builder turns normalized records (Arrow columns) into the JSON objects
its platform documents, as text, for a whole batch of rows at once:

* :mod:`.maestro_ondemand` — ``recip`` recipient objects;
* :mod:`.maestro_subscribe` — ``mSubscriber`` objects, one call each;
* :mod:`.yesmail` — ``recipients`` of a ``POST /v2/emails/send`` body.

:class:`~pipeline.payloads.batching.Batcher` cuts them into batches of at
most the job's batch size (and, for GET targets, short enough for a URL).
"""

from __future__ import annotations

from pipeline.config import HttpConfig, JobPlan
from pipeline.payloads.base import Builder
from pipeline.payloads.maestro_ondemand import OnDemandBuilder
from pipeline.payloads.maestro_subscribe import SubscribeBuilder
from pipeline.payloads.yesmail import YesmailBuilder

__all__ = ["Builder", "builder_for"]


def builder_for(plan: JobPlan, http: HttpConfig | None = None) -> Builder:
    """The payload builder of a job's target; ``http`` (``cfg.delivery.http``) names the
    endpoints its request files show (the defaults without it)."""
    if plan.target == "maestro-ondemand":
        return OnDemandBuilder(plan, http)
    if plan.target == "maestro-subscribe":
        return SubscribeBuilder(plan, http)
    return YesmailBuilder(plan, http)
