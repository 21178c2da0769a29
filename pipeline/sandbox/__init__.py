"""The sandbox server: the platforms' documented HTTP endpoints, served over the engine.

``mailpipe sandbox`` answers Maestro trigger URLs and ``addSubscriberExternally.do``,
Yesmail ``emails/send`` with its tickets and async results, and the InboxFirst
mailing-list API, from the same store and engine as ``simulate`` mode:

* :mod:`.credentials` — the per-job security tokens, API key and Basic-auth
  credentials (stable for a config and store) and the ``export`` lines;
* :mod:`.server` — the aiohttp application, its test knobs, and how to run it;
* :mod:`.inboxfirst` — the mailing-list endpoints and the lists they keep.
"""
