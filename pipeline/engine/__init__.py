"""The platforms' documented rules, answering from the store: the simulate engine.

One module per platform, each free of delivery concerns — payloads (or their
columns) in, documented responses out, store updated — so the same code
answers ``simulate`` runs and the sandbox HTTP server:

* :mod:`.ondemand` — Maestro on-demand recipients;
* :mod:`.subscribe` — Maestro ``addSubscriberExternally.do``;
* :mod:`.yesmail` — Yesmail ``emails/send``, tickets and async results.
"""
