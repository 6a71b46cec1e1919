"""Scale-out on Ray Serve: ``python -m server.cluster`` runs many replicas of the server's engine.

Hops of a request (docs/scale-out.md has the picture):

* ``ingress`` (Serve's ingress deployment, no model): the gRPC services through Serve's gRPC proxy
  (``grpc_services`` registers them there) and the OpenAI HTTP API through Serve's HTTP proxy; it
  reads the adapter id of each request and calls the engine deployment with
  ``handle.options(multiplexed_model_id=<adapter id>)``, so Serve's router prefers a replica that
  already holds that adapter.
* ``replica`` (the engine deployment): today's :class:`server.app.ServerApp`, unchanged, one per
  replica; ``@serve.multiplexed`` loads an adapter from the adapter store on first use there, at
  most ``--max-adapters-per-replica`` at a time (LRU), and the same handlers as the single server
  answer (gRPC servicers and the OpenAI app, called in process).
* adapter admin writes the adapter store (``--adapter-root``, shared by every replica) and evicts
  the adapter from every replica (``DeploymentHandle.broadcast``) before it returns.
"""
